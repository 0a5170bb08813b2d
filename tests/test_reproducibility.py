"""Rebuilding the pipeline gives the same bytes.

On a tiny-parameter copy of the project, ``dvc repro --force`` after a first
``dvc repro`` must give byte-identical data, checkpoints, samples, metrics, plot data
and figures, and the same hashes in dvc.lock. Timings are exempt: the files under
reports/timing/ and the report's last section, which lists them with the machine.
The first tests check, in-process, that the writers put no time stamps or random
names into their output.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline_utils import DVC, clone_built_pipeline, run  # noqa: E402
from stages import common  # noqa: E402

# Outputs that hold timings (or list them) and so differ between identical runs.
TIMING_DIR = "reports/timing"
REPORT_FILES = ("reports/report.md", "reports/report.html")
# The report's last section lists the machine and the timings; everything before it must match.
REPORT_TAIL = {"reports/report.md": "\n## Environment\n", "reports/report.html": '<h2 id="environment">'}


# ---------------------------------------------------------------- the writers


def test_save_torch_same_bytes_for_any_temp_name(tmp_path):
    state = {"weights": torch.arange(6.0).reshape(2, 3), "step": 3}

    common.save_torch(tmp_path / "a" / "model.pt", state)
    common.save_torch(tmp_path / "b" / "model.pt", state)

    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_save_npz_same_bytes_later(tmp_path):
    arrays = {"train": np.arange(10, dtype=np.float32), "test": np.ones((2, 2))}

    common.save_npz(tmp_path / "first.npz", **arrays)
    time.sleep(2.1)  # zip stores times in 2-second steps
    common.save_npz(tmp_path / "second.npz", **arrays)

    assert (tmp_path / "first.npz").read_bytes() == (tmp_path / "second.npz").read_bytes()


def draw_figure():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1, 2], [1, 0, 2], label="u_t")
    ax.legend()
    return fig


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_save_figure_same_bytes_later(tmp_path, suffix):
    common.save_figure(draw_figure(), tmp_path / f"first{suffix}")
    time.sleep(1.1)
    common.save_figure(draw_figure(), tmp_path / f"second{suffix}")

    assert (tmp_path / f"first{suffix}").read_bytes() == (tmp_path / f"second{suffix}").read_bytes()


def test_write_json_sorted_keys(tmp_path):
    common.write_json(tmp_path / "a.json", {"w2": 1.0, "energy": 2.0})
    common.write_json(tmp_path / "b.json", {"energy": 2.0, "w2": 1.0})

    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


# ---------------------------------------------------------------- the whole pipeline


def file_hashes(root: Path) -> dict[str, str]:
    """Return the SHA-256 of every file under data/ and reports/, timings excepted, the report cut before its last section."""
    hashes = {}
    for folder in ("data", "reports"):
        for path in sorted((root / folder).rglob("*")):
            name = path.relative_to(root).as_posix()
            if not path.is_file() or name.startswith(TIMING_DIR + "/") or path.name == ".gitignore":
                continue
            data = path.read_bytes()
            if name in REPORT_TAIL:
                marker = REPORT_TAIL[name].encode("utf-8")
                assert marker in data, f"{name} has no {REPORT_TAIL[name]!r}; update REPORT_TAIL"
                data = data[: data.index(marker)]
            hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


def lock_hashes(root: Path) -> dict[str, str]:
    """Return ``stage: path -> md5`` for every dependency and output in dvc.lock, timings and the report excepted."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    hashes = {}
    for stage, entry in lock["stages"].items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []):
                path = item["path"]
                if path == TIMING_DIR or path.startswith(TIMING_DIR + "/") or path in REPORT_FILES:
                    continue
                hashes[f"{stage}: {kind} {path}"] = item.get("md5") or item.get("hash") or str(item)
    return hashes


def differences(first: dict[str, str], second: dict[str, str]) -> list[str]:
    return sorted(name for name in first.keys() | second.keys() if first.get(name) != second.get(name))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Return a copy of the built pipeline after ``dvc repro --force``, with the file and lock hashes from before."""
    repo = clone_built_pipeline(tmp_path_factory.mktemp("reproducibility") / "repo")
    before = (file_hashes(repo), lock_hashes(repo))
    run([DVC, "repro", "--force"], repo)
    return repo, *before


@pytest.mark.slow
def test_forced_repro_same_files(rebuilt):
    repo, files_before, _ = rebuilt
    files_after = file_hashes(repo)

    assert len(files_before) > 20
    assert differences(files_before, files_after) == []


@pytest.mark.slow
def test_forced_repro_same_lock_hashes(rebuilt):
    repo, _, lock_before = rebuilt
    lock_after = lock_hashes(repo)

    assert len(lock_before) > 20
    assert differences(lock_before, lock_after) == []


@pytest.mark.slow
def test_lock_records_every_stage(rebuilt):
    repo, _, _ = rebuilt
    stages = set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])

    assert {"prepare", "train@moons", "sample@moons", "evaluate@moons", "report"} <= stages
