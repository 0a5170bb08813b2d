"""Tests of the prepare stage: outputs and manifest, reproducibility, rejected parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flowmatch.datasets import make_toy
from stages import prepare

REPO = Path(__file__).resolve().parents[1]


def write_params(directory: Path, **data_overrides) -> None:
    """Write the repository's params.yaml into ``directory`` with small sets and ``data`` overrides."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"n_train": 300, "n_test": 200})
    params["data"].update(data_overrides)
    (directory / "params.yaml").write_text(yaml.safe_dump(params))


def run_module(directory: Path, module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module], cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    prepare.main()
    return tmp_path / "data" / "prepared"


def test_prepare_writes_every_set(prepared):
    names = {path.stem for path in prepared.glob("*.npz")}
    assert names == {"moons", "checkerboard", "eight_gaussians", "gaussian", "digits"}


def test_prepare_toy_arrays(prepared):
    with np.load(prepared / "moons.npz") as archive:
        assert archive["train"].shape == (300, 2)
        assert archive["test"].shape == (200, 2)
        assert archive["train"].dtype == np.float32


def test_prepare_toy_manifest_rebuilds_sampler(prepared):
    entry = json.loads((prepared / "manifest.json").read_text())["checkerboard"]
    options = dict(entry["sampler"])
    toy = make_toy(options.pop("name"), **options)
    assert entry["kind"] == "toy"
    assert entry["shape"] == [2]
    assert entry["scale"] == pytest.approx(toy.scale)
    assert options == {"cells": 4}


def test_prepare_gaussian_parameters(prepared):
    with np.load(prepared / "gaussian.npz") as archive:
        assert archive["mean"].shape == (2,)
        assert archive["cov"].dtype == np.float64
        assert np.allclose(archive["cov"], archive["cov"].T)
    assert json.loads((prepared / "manifest.json").read_text())["gaussian"]["kind"] == "gaussian"


def test_prepare_digits_split(prepared):
    entry = json.loads((prepared / "manifest.json").read_text())["digits"]
    with np.load(prepared / "digits.npz") as archive:
        assert archive["train"].shape == (entry["n_train"], 1, 8, 8)
        assert archive["test_labels"].shape == (entry["n_test"],)
        assert archive["test"].min() >= -1.0
        assert archive["test"].max() <= 1.0
    assert entry["kind"] == "image"
    assert entry["n_train"] + entry["n_test"] == 1797


def test_prepare_train_and_test_independent(prepared):
    with np.load(prepared / "eight_gaussians.npz") as archive:
        train, test = archive["train"], archive["test"]
    assert not np.allclose(train[: len(test)], test)


def test_prepare_reproducible(prepared):
    first = (prepared / "moons.npz").read_bytes()
    prepare.main()
    assert (prepared / "moons.npz").read_bytes() == first


def test_prepare_rejects_negative_count(tmp_path):
    write_params(tmp_path, n_train=-5)
    result = run_module(tmp_path, "stages.prepare")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "data.n_train" in result.stderr
    assert "-5" in result.stderr
    assert not (tmp_path / "data").exists()


def test_prepare_rejects_one_cell_board(tmp_path):
    write_params(tmp_path, checkerboard_cells=1)
    result = run_module(tmp_path, "stages.prepare")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: params.yaml: invalid value for 'data.checkerboard_cells'")
