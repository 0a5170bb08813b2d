"""Tests of the sample stage: keys and NFE per solver and budget, schedule change, rejected inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.models import build_model
from flowmatch.schedules import get_schedule
from flowmatch.solvers import NFE_PER_STEP
from flowmatch.training import Trainer, TrainSettings, model_file_contents, schedule_config
from stage_utils import copy_params, run_in_directory, run_stage_expecting_error
from stages import sample as sample_stage

CONFIG = {"kind": "mlp", "shape": [2], "hidden": 16, "layers": 2, "time_dim": 8}
SOLVERS = ["euler", "midpoint", "rk4", "dopri5"]
BUDGETS = [2, 8, 64]


def write_params(directory: Path, **sample_overrides) -> None:
    copy_params(directory, {"sample": {"solvers": SOLVERS, "nfe": BUDGETS, "n_samples": 64, "seed": 3, **sample_overrides}})


def write_model(directory: Path, dataset: str = "moons", poison: bool = False) -> None:
    """Write a model file trained for a few steps on Gaussian data; ``poison`` sets its EMA weights to NaN."""
    torch.manual_seed(0)
    settings = TrainSettings(steps=5, batch_size=32, lr=1e-2, warmup_steps=1, grad_clip=1.0, ema_decay=0.5)
    trainer = Trainer(build_model(CONFIG), get_schedule("cosine"), settings, seed=0)
    for _ in range(5):
        trainer.step(torch.randn(32, 2) * 0.5 + 1.0)
    contents = model_file_contents(trainer, CONFIG, schedule_config("cosine"), dataset)
    if poison:
        contents["ema"] = {name: torch.full_like(value, float("nan")) for name, value in contents["ema"].items()}
    path = directory / "data" / "models" / dataset / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(contents, path)


def run_sample(directory: Path, dataset: str = "moons") -> dict:
    run_in_directory(sample_stage.main, directory, dataset)
    return json.loads((directory / "data" / "samples" / dataset / "manifest.json").read_text())


def load_samples(directory: Path, dataset: str = "moons") -> dict[str, np.ndarray]:
    with np.load(directory / "data" / "samples" / dataset / "samples.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture
def workdir(tmp_path):
    write_params(tmp_path)
    write_model(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Return the folder and manifest of one default sample run, shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("sampled")
    write_params(directory)
    write_model(directory)
    return directory, run_sample(directory)


@pytest.fixture
def manifest(sampled):
    return sampled[1]


def test_sample_keys_match_manifest(sampled, manifest):
    samples = load_samples(sampled[0])

    assert sorted(samples) == sorted(record["key"] for record in manifest["records"])
    for record in manifest["records"]:
        assert record["key"] == f"{record['solver']}_nfe{record['nfe_budget']}"
        assert samples[record["key"]].shape == (64, 2)
        assert samples[record["key"]].dtype == np.float32


def test_sample_fixed_step_nfe(manifest):
    fixed = [record for record in manifest["records"] if record["solver"] != "dopri5"]
    budgets = {(record["solver"], record["nfe_budget"]) for record in fixed}

    # rk4 needs 4 evaluations per step, so the budget of 2 is skipped for it only.
    assert budgets == {("euler", 2), ("euler", 8), ("euler", 64), ("midpoint", 2), ("midpoint", 8), ("midpoint", 64), ("rk4", 8), ("rk4", 64)}
    for record in fixed:
        assert record["steps"] == record["nfe_budget"] // NFE_PER_STEP[record["solver"]]
        assert record["nfe"] == record["steps"] * NFE_PER_STEP[record["solver"]]


def test_sample_dopri5_within_budget(manifest):
    adaptive = [record for record in manifest["records"] if record["solver"] == "dopri5"]

    assert 64 in [record["nfe_budget"] for record in adaptive]
    assert 2 not in [record["nfe_budget"] for record in adaptive]
    for record in adaptive:
        assert record["nfe"] <= record["nfe_budget"]
        assert record["tolerance"] > 0


def test_sample_solvers_share_noise(sampled):
    samples = load_samples(sampled[0])

    # Both integrate the same ODE from the same starting points accurately.
    assert np.abs(samples["rk4_nfe64"] - samples["dopri5_nfe64"]).max() < 1e-2


def test_sample_manifest_schedules(manifest):
    assert manifest["train_schedule"] == "cosine"
    assert manifest["sample_schedule"] == "cosine"
    assert manifest["n_samples"] == 64


def test_sample_timing_file(sampled):
    timing = json.loads((sampled[0] / "reports" / "timing" / "sample_moons.json").read_text())

    assert set(timing) == {"seconds", "samples_per_second", "nfe"}
    assert set(timing["samples_per_second"]) == set(SOLVERS)
    assert timing["nfe"]["euler"] == 64


def test_sample_reproducible(workdir):
    run_sample(workdir)
    first = load_samples(workdir)
    run_sample(workdir)
    second = load_samples(workdir)

    for key, value in first.items():
        assert np.array_equal(value, second[key]), key


def test_sample_schedule_change(tmp_path):
    write_params(tmp_path, schedule="linear", solvers=["rk4"], nfe=[32])
    write_model(tmp_path)

    manifest = run_sample(tmp_path)
    samples = load_samples(tmp_path)
    assert manifest["train_schedule"] == "cosine"
    assert manifest["sample_schedule"] == "linear"
    assert np.isfinite(samples["rk4_nfe32"]).all()


def test_dopri5_picks_tightest_fitting_tolerance():
    velocity = lambda x, t: torch.cos(3 * t) * x  # noqa: E731
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    tolerances = (1e-1, 1e-3, 1e-5, 1e-7)

    runs = sample_stage.dopri5_runs(velocity, x0, (20, 60, 200), tolerances)
    everything = sample_stage.dopri5_runs(velocity, x0, (10_000,), tolerances)[10_000]
    assert everything.tolerance == 1e-7
    for budget, run in runs.items():
        assert run.nfe <= budget
        tighter = [tolerance for tolerance in tolerances if tolerance < run.tolerance]
        for tolerance in tighter:
            assert sample_stage.dopri5_runs(velocity, x0, (10_000,), (tolerance,))[10_000].nfe > budget


def assert_no_output(directory: Path) -> None:
    assert not (directory / "data" / "samples").exists()
    assert not (directory / "reports").exists()


def test_sample_unknown_dataset_exits(workdir, capsys):
    message = run_stage_expecting_error(sample_stage.main, workdir, capsys, "mnist")

    assert "mnist" in message
    assert_no_output(workdir)


def test_sample_unknown_solver_exits(workdir, capsys):
    write_params(workdir, solvers=["euler", "leapfrog"])

    message = run_stage_expecting_error(sample_stage.main, workdir, capsys, "moons")
    assert "'sample.solvers[1]'" in message
    assert_no_output(workdir)


@pytest.mark.parametrize(("key", "value", "named"), [("n_samples", -5, "sample.n_samples"), ("nfe", [8, -4], "sample.nfe[1]"), ("nfe", [8, 8], "sample.nfe")])
def test_sample_bad_count_exits(workdir, capsys, key, value, named):
    write_params(workdir, **{key: value})

    message = run_stage_expecting_error(sample_stage.main, workdir, capsys, "moons")
    assert f"'{named}'" in message
    assert_no_output(workdir)


def test_sample_missing_model_exits(tmp_path, capsys):
    write_params(tmp_path)

    message = run_stage_expecting_error(sample_stage.main, tmp_path, capsys, "moons")
    assert "data/models/moons/model.pt" in message


def test_sample_non_finite_exits_with_count(tmp_path, capsys):
    write_params(tmp_path)
    write_model(tmp_path, poison=True)

    message = run_stage_expecting_error(sample_stage.main, tmp_path, capsys, "moons")
    assert "64 of 64 samples are not finite" in message
    assert_no_output(tmp_path)
