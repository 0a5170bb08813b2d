"""Helpers for tests that run the DVC pipeline in a temporary copy of the repository.

``TINY`` shrinks every stage to seconds. ``copy_project`` copies the tracked and
untracked (not ignored) files without stage outputs, and ``init_git`` makes the copy a
git repository. ``built_pipeline`` returns a copy on which ``dvc repro`` has finished,
built once per test process. ``declared_outputs`` and ``check_complete`` list and
check the outputs that dvc.yaml declares.
"""

from __future__ import annotations

import atexit
import csv
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

# Overrides that shrink every stage to seconds; keys must exist in params.yaml.
TINY = {
    "data": {"n_train": 400, "n_test": 200},
    "noise_sequence": {"size": 48, "steps": 4},
    "single_point": {"n_samples": 400, "n_endpoints": 100, "steps": [2, 4, 8], "tolerances": [1.0e-3, 1.0e-5], "n_trajectories": 8},
    "marginal_flow": {"n_points": 16, "n_samples": 64, "mc_sizes": [100, 1000], "mc_n_query": 16, "continuity_spacings": [0.1, 0.05]},
    "train": {"steps": 30, "batch_size": 64, "hidden": 32, "checkpoint_every": 10, "warmup_steps": 5, "log_every": 10},
    "sample": {"n_samples": 64, "nfe": [4, 8], "dopri5_tolerances": [0.1, 0.01]},
    "evaluate": {"n_eval": 64, "floor_seeds": 2, "nll_n": 64, "straightness_n": 64, "velocity_error_n": 256},
    "classifier": {"epochs": 1, "min_accuracy": 0.0},
}

# The temporary names of stages.common.atomic_path, ".STEM.PID.RANDOM.tmpSUFFIX", and older
# ones without the process id.
TEMP_NAME = re.compile(r"^\..+\.tmp(\.[^.]*)?$")


def tiny_params(raw: dict, overrides: dict = TINY) -> dict:
    """Return ``raw`` (parsed params.yaml) with ``overrides`` applied in place."""
    for section, values in overrides.items():
        for key, value in values.items():
            assert key in raw[section], f"params.yaml has no {section}.{key}; update TINY"
            raw[section][key] = value
    return raw


def environment() -> dict[str, str]:
    """Return the environment for DVC and stage commands: the project's Python first on PATH, no analytics."""
    return dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd`` and fail the test, with the end of its output, if it exits non-zero."""
    result = subprocess.run(args, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def copy_project(root: Path, overrides: dict | None = TINY) -> Path:
    """Copy the project's source files (no data, reports or dvc.lock) to ``root``; apply ``overrides`` to params.yaml."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.is_file() or name.startswith(("reports/", "data/")) or name == "dvc.lock":
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    if overrides is not None:
        raw = yaml.safe_load((root / "params.yaml").read_text())
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw, overrides), sort_keys=False))
    return root


def init_git(root: Path) -> None:
    """Make ``root`` a git repository with one commit of everything in it."""
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q"], root)
    run(["git", *identity, "add", "-A"], root)
    run(["git", *identity, "commit", "-qm", "tiny"], root)


@functools.cache
def built_pipeline() -> Path:
    """Return a tiny-parameter copy of the project on which ``dvc repro`` has finished.

    Built once per test process and removed at exit. Tests must not change it: they
    copy it with ``clone_built_pipeline`` first.
    """
    base = Path(tempfile.mkdtemp(prefix="flowmatch-pipeline-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    root = copy_project(base / "repo")
    init_git(root)
    run([DVC, "repro"], root)
    return root


def clone_built_pipeline(target: Path) -> Path:
    """Copy the repository of ``built_pipeline`` (git history, DVC cache and outputs) to ``target``."""
    shutil.copytree(built_pipeline(), target, symlinks=True)
    return target


def _entry_paths(entries: list | None) -> list[str]:
    paths = []
    for entry in entries or []:
        paths.extend(entry if isinstance(entry, dict) else [entry])
    return paths


def declared_outputs(root: Path) -> dict[str, list[Path]]:
    """Return, per stage of ``root/dvc.yaml`` (``name@value`` for matrix stages), its outs, metrics and plots paths."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    result = {}
    for name, stage in stages.items():
        paths = _entry_paths(stage.get("outs")) + _entry_paths(stage.get("metrics")) + _entry_paths(stage.get("plots"))
        matrix = stage.get("matrix")
        if not matrix:
            result[name] = [root / p for p in paths]
            continue
        keys = list(matrix)
        for values in itertools.product(*(matrix_values(root, matrix[k]) for k in keys)):
            resolved = []
            for path in paths:
                for key, value in zip(keys, values):
                    path = path.replace(f"${{item.{key}}}", str(value))
                resolved.append(root / path)
            result[f"{name}@{'-'.join(map(str, values))}"] = resolved
    return result


def matrix_values(root: Path, values: list | str) -> list:
    """Return a matrix entry's list, looking up ``${a.b}`` in ``root/params.yaml`` as DVC does."""
    if isinstance(values, list):
        return values
    match = re.fullmatch(r"\$\{([\w.]+)\}", values)
    assert match, f"matrix entry {values!r} is neither a list nor a ${{...}} reference"
    value = yaml.safe_load((root / "params.yaml").read_text())
    for key in match.group(1).split("."):
        value = value[key]
    return value


def output_files(path: Path) -> list[Path]:
    """Return the files of an output: the path itself, or every file under a directory."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.exists() else []


def temp_files(paths: list[Path]) -> list[Path]:
    """Return the atomic-write temporaries among the files of ``paths`` and next to them."""
    found = set()
    for path in paths:
        folder = path if path.is_dir() else path.parent
        if folder.is_dir():
            found.update(p for p in folder.rglob("*") if p.is_file() and TEMP_NAME.match(p.name))
    return sorted(found)


def check_complete(path: Path) -> None:
    """Raise ``AssertionError`` unless the file at ``path`` decodes completely in the format of its extension."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        elif suffix == ".npz":
            _check_npz(path)
        elif suffix in (".png", ".gif", ".jpg", ".jpeg"):
            _check_image(path)
        elif suffix == ".pt":
            _check_torch(path)
        elif suffix in (".csv", ".tsv"):
            _check_table(path, "\t" if suffix == ".tsv" else ",")
        else:
            path.read_text(encoding="utf-8")
    except AssertionError:
        raise
    except Exception as error:  # each decoder raises its own types for a truncated file
        raise AssertionError(f"{path}: incomplete or corrupt ({type(error).__name__}: {error})") from error


def _reject_constant(token: str):
    raise ValueError(f"non-standard JSON constant {token}")


def _check_npz(path: Path) -> None:
    import numpy as np

    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
        assert bad is None, f"{path}: member {bad} fails its CRC check"
    with np.load(path, allow_pickle=False) as arrays:
        for key in arrays.files:
            arrays[key]


def _check_image(path: Path) -> None:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            frame.load()


def _check_torch(path: Path) -> None:
    import torch

    torch.load(path, map_location="cpu", weights_only=True)


def _check_table(path: Path, delimiter: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{path}: the last line is cut off"
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    assert rows, f"{path}: empty table"
    widths = {len(row) for row in rows}
    assert len(widths) == 1, f"{path}: rows of {sorted(widths)} fields"
