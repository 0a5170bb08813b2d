"""Tests of the prepare stage: outputs and manifest, reproducibility, rejected parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowmatch.datasets import make_toy
from stage_utils import copy_params, run_python_module
from stages import prepare


def write_params(directory: Path, **data_overrides) -> None:
    """Write the repository's params.yaml into ``directory`` with small sets and ``data`` overrides."""
    copy_params(directory, {"data": {"n_train": 300, "n_test": 200, **data_overrides}})


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
    result = run_python_module("stages.prepare", tmp_path, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "data.n_train" in result.stderr
    assert "-5" in result.stderr
    assert not (tmp_path / "data").exists()


def test_prepare_rejects_one_cell_board(tmp_path):
    write_params(tmp_path, checkerboard_cells=1)
    result = run_python_module("stages.prepare", tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: params.yaml: invalid value for 'data.checkerboard_cells'")
