"""Tests of the evaluate stage on tiny prepared data and hand-made sample sets.

Samples drawn from the true distribution must score within the noise floor's spread,
shifted or corrupted samples far above it, and copies of training images must show up
as memorisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from flowmatch.datasets import make_rng, make_toy, sample_gaussian
from stages import classifier, evaluate, prepare
from stages.common import save_npz

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 300


def write_samples(directory: Path, dataset: str, sets: dict[tuple[str, int], np.ndarray], wrap: bool = True) -> None:
    """Write ``data/samples/DATASET`` with one array per ``(solver, nfe budget)``, as the sample stage does."""
    arrays, records = {}, []
    for (solver, budget), points in sets.items():
        key = f"{solver}_nfe{budget}"
        arrays[key] = points.astype(np.float32)
        records.append({"solver": solver, "nfe_budget": budget, "nfe": budget + 1, "steps": budget, "key": key, "seconds": 0.01})
    folder = directory / "data" / "samples" / dataset
    save_npz(folder / "samples.npz", **arrays)
    manifest = {"records": records, "schedule": "cosine"} if wrap else records
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_evaluate(directory: Path, dataset: str) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        patch.setattr(sys, "argv", ["evaluate", dataset])
        evaluate.main()
    return json.loads((directory / "reports" / "metrics" / f"{dataset}.json").read_text())


def run_module(directory: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.evaluate", *arguments], cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with small prepared sets, a briefly trained classifier and sample sets."""
    directory = tmp_path_factory.mktemp("evaluate")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"n_train": 400, "n_test": 400})
    params["classifier"].update({"epochs": 4, "min_accuracy": 0.5})
    params["evaluate"].update({"n_eval": 2000, "floor_seeds": 5})
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        prepare.main()
        classifier.main()

    rng = make_rng(99, "test samples")
    moons = make_toy("moons", noise=0.05)
    write_samples(
        directory,
        "moons",
        {
            ("euler", 4): moons.sample(N_SAMPLES, rng) + 1.0,
            ("euler", 8): moons.sample(N_SAMPLES, rng),
            ("rk4", 4): moons.sample(N_SAMPLES, rng),
            ("rk4", 8): moons.sample(N_SAMPLES, rng) + np.array([0.6, 0.0]),
        },
    )
    with np.load(directory / "data" / "prepared" / "gaussian.npz") as archive:
        mean, cov = archive["mean"], archive["cov"]
    write_samples(
        directory,
        "gaussian",
        {("midpoint", 16): sample_gaussian(mean, cov, N_SAMPLES, rng), ("euler", 16): rng.standard_normal((N_SAMPLES, 2))},
        wrap=False,
    )
    with np.load(directory / "data" / "prepared" / "digits.npz") as archive:
        train, test = archive["train"], archive["test"]
    corrupted = np.clip(test + 0.8 * rng.standard_normal(test.shape), -1.0, 1.0)
    nan_set = test.copy()
    nan_set[0, 0, 0, 0] = np.nan
    # Every digit set has the held-out size, so the stage scores the held-out set whole, in order.
    write_samples(
        directory,
        "digits",
        {("euler", 8): train[: len(test)], ("rk4", 8): test, ("midpoint", 8): corrupted, ("heun", 8): nan_set},
    )
    return directory


@pytest.fixture(scope="module")
def moons_metrics(project):
    return run_evaluate(project, "moons")


@pytest.fixture(scope="module")
def digits_metrics(project):
    return run_evaluate(project, "digits")


def test_evaluate_true_samples_within_floor(moons_metrics):
    spread = 4.0 * moons_metrics["w2_floor_std"]
    assert moons_metrics["w2"] < moons_metrics["w2_floor"] + spread
    assert moons_metrics["w2"] > moons_metrics["w2_floor"] - spread


def test_evaluate_energy_and_mmd_within_floor(moons_metrics):
    for name in ("energy", "mmd"):
        assert moons_metrics[name] < moons_metrics[f"{name}_floor"] + 4.0 * moons_metrics[f"{name}_floor_std"], name


def test_evaluate_shifted_samples_far_above_floor(moons_metrics):
    shifted = moons_metrics["by_solver"]["rk4"]["nfe8"]
    assert shifted["w2"] == pytest.approx(0.6, abs=0.1)
    assert shifted["w2"] > moons_metrics["w2_floor"] + 10.0 * moons_metrics["w2_floor_std"]
    assert shifted["energy"] > 3.0 * moons_metrics["energy_floor"]
    assert shifted["mmd"] > 3.0 * moons_metrics["mmd_floor"]


def test_evaluate_headline_best_at_largest_budget(moons_metrics):
    assert moons_metrics["solver"] == "euler"
    assert moons_metrics["nfe_budget"] == 8
    assert moons_metrics["nfe"] == 9


def test_evaluate_uses_smallest_set_size(moons_metrics):
    assert moons_metrics["n_eval"] == N_SAMPLES


def test_evaluate_by_solver_complete(moons_metrics):
    assert set(moons_metrics["by_solver"]) == {"euler", "rk4"}
    assert set(moons_metrics["by_solver"]["euler"]) == {"nfe4", "nfe8"}
    assert set(moons_metrics["by_solver"]["euler"]["nfe4"]) == {"nfe", "w2", "energy", "mmd"}


def test_evaluate_plot_csv(project, moons_metrics):
    frame = pd.read_csv(project / "reports" / "plots" / "moons" / "quality_vs_nfe.csv")
    assert list(frame.columns) == ["solver", "nfe_budget", "nfe", "energy", "mmd", "w2"]
    assert len(frame) == 4


def test_evaluate_figures_wide_png(project, moons_metrics):
    for name in ("samples.png", "quality_vs_nfe.png"):
        path = project / "reports" / "figures" / "moons" / name
        assert path.stat().st_size < 2 * 1024 * 1024
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 600


def test_evaluate_gaussian_case(project):
    metrics = run_evaluate(project, "gaussian")
    assert metrics["solver"] == "midpoint"
    assert metrics["w2"] < metrics["w2_floor"] + 4.0 * metrics["w2_floor_std"]
    assert metrics["by_solver"]["euler"]["nfe16"]["w2"] > metrics["w2_floor"] + 10.0 * metrics["w2_floor_std"]


def test_evaluate_digits_memorisation(digits_metrics):
    copies = digits_metrics["by_solver"]["euler"]["nfe8"]["memorisation"]
    fresh = digits_metrics["by_solver"]["rk4"]["nfe8"]["memorisation"]
    assert copies == 0.0
    assert fresh == pytest.approx(1.0, abs=1e-12)
    assert digits_metrics["memorisation_reference"] == pytest.approx(1.0, abs=4.0 * digits_metrics["memorisation_reference_std"] + 0.02)


def test_evaluate_digits_fid(digits_metrics):
    # Held-out images scored against themselves give 0; heavy pixel noise lands far above the floor.
    assert digits_metrics["by_solver"]["rk4"]["nfe8"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert digits_metrics["by_solver"]["midpoint"]["nfe8"]["fid"] > 3.0 * digits_metrics["fid_floor"]
    assert digits_metrics["fid_floor"] > 0.0


def test_evaluate_digits_entropy_and_accuracy(project, digits_metrics):
    report = json.loads((project / "reports" / "metrics" / "classifier.json").read_text())
    assert digits_metrics["accuracy"] == report["accuracy"]
    assert digits_metrics["entropy"] == pytest.approx(digits_metrics["entropy_heldout"])
    assert digits_metrics["entropy"] <= digits_metrics["entropy_max"]
    assert digits_metrics["entropy_heldout"] > 0.95 * digits_metrics["entropy_max"]


def test_evaluate_nan_set_reported_null(digits_metrics):
    assert digits_metrics["by_solver"]["heun"]["nfe8"]["fid"] is None
    assert digits_metrics["solver"] == "rk4"


def test_evaluate_digit_grid_written(project, digits_metrics):
    with Image.open(project / "reports" / "figures" / "digits" / "samples.png") as image:
        assert image.width >= 600


def test_evaluate_unknown_dataset(project):
    result = run_module(project, "spirals")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "'spirals'" in result.stderr
    assert "accepted: moons" in result.stderr
    assert not (project / "reports" / "metrics" / "spirals.json").exists()


def test_evaluate_missing_argument(project):
    result = run_module(project)
    assert result.returncode == 2
    assert "usage: python -m stages.evaluate DATASET" in result.stderr


def test_evaluate_missing_samples(project):
    result = run_module(project, "checkerboard")
    assert result.returncode == 2
    assert "data/samples/checkerboard/samples.npz: file not found" in result.stderr
    assert not (project / "reports" / "metrics" / "checkerboard.json").exists()


def test_evaluate_truncated_prepared_file(project, tmp_path):
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text((project / "data" / "prepared" / "manifest.json").read_text())
    data = (project / "data" / "prepared" / "moons.npz").read_bytes()
    (prepared / "moons.npz").write_bytes(data[: len(data) // 2])
    result = run_module(tmp_path, "moons")
    assert result.returncode == 2
    assert "data/prepared/moons.npz: cannot read the file" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_sample_records_missing_key():
    with pytest.raises(evaluate.StageError, match="record 0 lacks key"):
        evaluate.sample_records([{"solver": "euler", "nfe": 4}], Path("manifest.json"))


def test_parse_dataset_accepts_known():
    assert evaluate.parse_dataset(["digits"]) == "digits"
