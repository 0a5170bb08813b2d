"""A stage stopped at any moment leaves each output either complete or as it was.

On a tiny-parameter copy of the project where ``dvc repro`` has finished, each long
stage is started as a subprocess and stopped with SIGTERM, then with SIGKILL. The
signal comes just after the stage starts writing: a seeded random delay after the
first change in its output folders. Every output that dvc.yaml declares must then
still decode completely.
After SIGTERM no temporary file may remain; after SIGKILL any that remains must be
ignored by DVC. A final ``dvc repro`` must finish and leave ``dvc status`` clean,
with no temporary file in DVC's cache.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline_utils import DVC, TEMP_NAME, check_complete, clone_built_pipeline, declared_outputs, environment, output_files, run, temp_files
from stages import common

# Stage name in dvc.yaml -> its command-line arguments.
LONG_STAGES = {
    "noise_sequence": ("noise_sequence", []),
    "single_point": ("single_point", []),
    "train@moons": ("train", ["moons"]),
    "sample@moons": ("sample", ["moons"]),
    "evaluate@moons": ("evaluate", ["moons"]),
}
SEED = 20240
MAX_DELAY_SECONDS = 0.05
STAGE_TIMEOUT_SECONDS = 240


@dataclass
class Interrupted:
    """What happened to one stage run: its exit code and whether the signal arrived while it ran."""

    stage: str
    returncode: int | None = None
    signalled: bool = False
    stderr: str = ""
    errors: list[str] = field(default_factory=list)


def watched_paths(repo: Path, stage: str) -> list[Path]:
    paths = declared_outputs(repo)[stage]
    if stage.startswith("train@"):
        paths.append(repo / "data" / "checkpoints" / stage.split("@")[1])
    return paths


def snapshot(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """Return the modification time and size of every file under ``paths``, temporary files included."""
    state = {}
    for path in paths:
        if path.is_dir():
            files = list(path.rglob("*"))
        else:
            files = [path, *path.parent.glob(f".{path.stem}.*")] if path.parent.is_dir() else [path]
        for file in files:
            try:
                info = file.stat()
            except FileNotFoundError:
                continue
            if file.is_file():
                state[file] = (info.st_mtime_ns, info.st_size)
    return state


def interrupt(repo: Path, stage: str, signum: int, rng: random.Random) -> Interrupted:
    """Start ``stage``, wait until it starts writing, wait a random moment, send ``signum``; return the outcome."""
    module, arguments = LONG_STAGES[stage]
    paths = watched_paths(repo, stage)
    before = snapshot(paths)
    delay = rng.uniform(0.0, MAX_DELAY_SECONDS)
    outcome = Interrupted(stage)
    process = subprocess.Popen(
        [sys.executable, "-m", f"stages.{module}", *arguments],
        cwd=repo, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()

    deadline = time.monotonic() + STAGE_TIMEOUT_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        if snapshot(paths) != before:
            time.sleep(delay)
            if process.poll() is None:
                process.send_signal(signum)
                outcome.signalled = True
            break
        time.sleep(0.002)
    try:
        outcome.returncode = process.wait(timeout=STAGE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        outcome.returncode = process.wait()
        outcome.errors.append("did not stop within the timeout")
    reader.join(timeout=10)
    outcome.stderr = "".join(stderr_lines)
    return outcome


def interrupt_all(repo: Path, signum: int) -> list[Interrupted]:
    """Interrupt every long stage at once, each from its own thread with its own seeded delay."""
    outcomes: dict[str, Interrupted] = {}

    def target(stage: str, seed: int) -> None:
        outcomes[stage] = interrupt(repo, stage, signum, random.Random(seed))

    threads = [threading.Thread(target=target, args=(stage, SEED + 100 * signum + i)) for i, stage in enumerate(LONG_STAGES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [outcomes[stage] for stage in LONG_STAGES]


def incomplete_outputs(repo: Path) -> list[str]:
    problems = []
    for stage in LONG_STAGES:
        for path in declared_outputs(repo)[stage]:
            for file in output_files(path):
                if TEMP_NAME.match(file.name):
                    continue
                try:
                    check_complete(file)
                except AssertionError as error:
                    problems.append(f"{stage}: {error}")
    return problems


def stage_temp_files(repo: Path) -> list[Path]:
    return temp_files([path for stage in LONG_STAGES for path in watched_paths(repo, stage)])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return clone_built_pipeline(tmp_path_factory.mktemp("interruptions") / "repo")


@pytest.fixture(scope="module")
def after_sigterm(repo) -> list[Interrupted]:
    return interrupt_all(repo, signal.SIGTERM)


@pytest.fixture(scope="module")
def after_sigkill(repo, after_sigterm) -> tuple[list[Interrupted], list[Path]]:
    outcomes = interrupt_all(repo, signal.SIGKILL)
    return outcomes, stage_temp_files(repo)


@pytest.mark.slow
def test_sigterm_stops_with_exit_code(after_sigterm):
    for outcome in after_sigterm:
        assert outcome.errors == [], outcome
        # 128 + 15 from run_stage; -15 when the signal came before run_stage started or after it returned.
        expected = {128 + signal.SIGTERM, -signal.SIGTERM} if outcome.signalled else {0}
        assert outcome.returncode in expected, f"{outcome.stage}: exit code {outcome.returncode}\n{outcome.stderr[-2000:]}"


@pytest.mark.slow
def test_sigterm_names_the_stop(after_sigterm):
    stopped = [outcome for outcome in after_sigterm if outcome.returncode == 128 + signal.SIGTERM]
    for outcome in stopped:
        assert "error: stopped by SIGTERM" in outcome.stderr, outcome.stderr[-2000:]
        assert "Traceback" not in outcome.stderr


@pytest.mark.slow
def test_sigterm_leaves_complete_outputs(repo, after_sigterm):
    assert incomplete_outputs(repo) == []


@pytest.mark.slow
def test_sigterm_leaves_no_temp_files(repo, after_sigterm):
    assert stage_temp_files(repo) == []


@pytest.mark.slow
def test_sigkill_leaves_complete_outputs(repo, after_sigkill):
    outcomes, _ = after_sigkill
    for outcome in outcomes:
        assert outcome.errors == [], outcome
        assert outcome.returncode in ({-signal.SIGKILL} if outcome.signalled else {0}), outcome.stderr[-2000:]
    assert incomplete_outputs(repo) == []


@pytest.mark.slow
def test_sigkill_temp_files_ignored_by_dvc(repo, after_sigkill):
    _, left = after_sigkill
    if not left:
        pytest.skip("no SIGKILL landed inside a write this time")
    relative = [str(path.relative_to(repo)) for path in left]
    result = subprocess.run([DVC, "check-ignore", *relative], cwd=repo, env=environment(), capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.split()) == sorted(relative)


@pytest.fixture(scope="module")
def reproduced(repo, after_sigkill) -> str:
    """Run ``dvc repro`` after both rounds of interruptions; return the output of ``dvc status``."""
    run([DVC, "repro"], repo)
    return run([DVC, "status"], repo).stdout


@pytest.mark.slow
def test_repro_after_interruptions_is_clean(repo, reproduced):
    assert "up to date" in reproduced or "Nothing to reproduce" in reproduced, reproduced
    assert incomplete_outputs(repo) == []


@pytest.mark.slow
def test_dvc_ignores_planted_temp_files(repo, reproduced):
    """Whether a SIGKILL above landed inside a write is chance, so plant the files such a kill leaves."""
    planted = [
        repo / "data" / "models" / "moons" / ".model.4000000.abcd1234.tmp.pt",
        repo / "reports" / "figures" / "single_point" / ".moments.4000000.abcd1234.tmp.png",
        repo / "reports" / "metrics" / ".moons.4000000.abcd1234.tmp.json",
    ]
    for path in planted:
        path.write_bytes(b"partial")
    try:
        status = run([DVC, "status"], repo).stdout
        ignored = run([DVC, "check-ignore", *(str(p.relative_to(repo)) for p in planted)], repo).stdout
    finally:
        for path in planted:
            path.unlink()

    assert "up to date" in status or "Nothing to reproduce" in status, status
    assert sorted(ignored.split()) == sorted(str(p.relative_to(repo)) for p in planted)


@pytest.mark.slow
def test_cache_holds_no_temp_files(repo, reproduced):
    listed = []
    for manifest in (repo / ".dvc" / "cache").rglob("*.dir"):
        listed += [entry["relpath"] for entry in json.loads(manifest.read_text())]

    assert listed
    assert [name for name in listed if TEMP_NAME.match(Path(name).name)] == []


# ---------------------------------------------------------------- the mechanisms, in-process


def test_sigterm_removes_temp_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "out" / "result.json"

    def main():
        with common.atomic_path(target) as tmp:
            tmp.write_text("{")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    with pytest.raises(SystemExit) as caught:
        common.run_stage(main)

    assert caught.value.code == 128 + signal.SIGTERM
    assert list(target.parent.iterdir()) == []
    assert "error: stopped by SIGTERM" in capsys.readouterr().err


def test_sigint_removes_temp_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "out" / "samples.npz"

    def main():
        with common.atomic_path(target) as tmp:
            tmp.write_bytes(b"PK")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)

    # A shell starts background jobs (and so some CI runners) with SIGINT ignored; Ctrl-C in
    # a terminal reaches Python's default handler, which this test needs.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as caught:
            common.run_stage(main)
    finally:
        signal.signal(signal.SIGINT, previous)

    assert caught.value.code == 128 + signal.SIGINT
    assert list(target.parent.iterdir()) == []
    assert "error: stopped by SIGINT" in capsys.readouterr().err


def test_sigterm_handler_restored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)

    common.run_stage(lambda: None)

    assert signal.getsignal(signal.SIGTERM) is before


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "models" / "moons"
    folder.mkdir(parents=True)
    stale = folder / f".model.{dead_pid()}.abcd1234.tmp.pt"
    live = folder / f".model.{os.getpid()}.abcd1234.tmp.pt"
    unrelated = folder / ".notes.tmp"
    for path in (stale, live, unrelated):
        path.write_bytes(b"partial")

    removed = common.remove_stale_temporaries()

    assert removed == [Path("data/models/moons") / stale.name]
    assert not stale.exists()
    assert live.exists()
    assert unrelated.exists()


def test_stale_temp_directory_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "reports" / "train"
    stale = folder / f".moons.{dead_pid()}.abcd1234.tmp"
    live = folder / f".gaussian.{os.getpid()}.abcd1234.tmp"
    for path in (stale, live):
        (path / "plots" / "metrics").mkdir(parents=True)
        (path / "plots" / "metrics" / "loss.tsv").write_text("step\tloss\n")

    removed = common.remove_stale_temporaries()

    assert removed == [Path("reports/train") / stale.name]
    assert not stale.exists()
    assert (live / "plots" / "metrics" / "loss.tsv").exists()


def test_atomic_directory_replaces_on_success(tmp_path):
    target = tmp_path / "log"
    target.mkdir()
    (target / "old.tsv").write_text("old")

    with common.atomic_directory(target) as staging:
        (staging / "new.tsv").write_text("new")
        assert common.TEMPORARY_NAME.match(staging.name)
        assert (target / "old.tsv").exists()

    assert sorted(path.name for path in target.iterdir()) == ["new.tsv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["log"]


def test_atomic_directory_keeps_old_on_error(tmp_path):
    target = tmp_path / "log"
    target.mkdir()
    (target / "old.tsv").write_text("old")

    with pytest.raises(RuntimeError), common.atomic_directory(target) as staging:
        (staging / "new.tsv").write_text("partial")
        raise RuntimeError("stopped")

    assert sorted(path.name for path in target.iterdir()) == ["old.tsv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["log"]


def test_temp_name_holds_pid(tmp_path):
    with common.atomic_path(tmp_path / "model.pt") as tmp:
        match = common.TEMPORARY_NAME.match(tmp.name)

    assert match is not None
    assert int(match["pid"]) == os.getpid()
