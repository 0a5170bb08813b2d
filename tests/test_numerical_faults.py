"""Non-finite numbers and corrupt input files stop a stage with one line naming the cause.

Training stops at the first non-finite loss or gradient, names the step and the likely
cause, writes no model and keeps its last checkpoint, whose weights stay finite.
Evaluation counts non-finite samples. A truncated or altered data file, a model or
checkpoint whose shapes do not fit, and sample sets of the wrong shape each fail
with a message naming the file. Other cases live in the stage tests: non-finite
samples in tests/test_stage_sample.py, a truncated prepared file for evaluate in
tests/test_stage_evaluate.py, images that cannot be decoded in
tests/test_stage_noise_sequence.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline_utils import REPO
from stage_utils import copy_params, run_in_directory, run_stage_expecting_error
from stages import evaluate as evaluate_stage
from stages import prepare as prepare_stage
from stages import sample as sample_stage
from stages import train as train_stage
from stages.config import load_params

TRAIN = {"steps": 30, "batch_size": 32, "hidden": 16, "layers": 2, "warmup_steps": 5, "log_every": 5, "checkpoint_every": 10, "device": "cpu"}
SAMPLE = {"n_samples": 64, "nfe": [4, 8], "solvers": ["euler", "rk4"]}
DATA = {"n_train": 300, "n_test": 200}
# Small learned-flow metrics for evaluate; keys missing from params.yaml are skipped.
EVALUATE = {"n_eval": 64, "floor_seeds": 2, "nll_n": 32, "nll_solver": "rk4", "nll_steps": 8, "straightness_n": 16, "straightness_steps": 4, "velocity_error_n": 64, "velocity_error_times": 4}
CHECKPOINT = Path("data/checkpoints/moons/checkpoint.pt")
MODEL = Path("data/models/moons/model.pt")


def write_params(directory: Path, **train) -> None:
    evaluate = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]
    sections = {
        "train": {**TRAIN, **train},
        "sample": SAMPLE,
        "data": DATA,
        "evaluate": {key: value for key, value in EVALUATE.items() if key in evaluate},
    }
    copy_params(directory, sections)


def write_moons(directory: Path, train: np.ndarray | None = None) -> Path:
    """Write data/prepared/moons.npz holding ``train`` (default: 300 standard normal points)."""
    if train is None:
        train = np.random.default_rng(0).standard_normal((300, 2)).astype(np.float32)
    path = directory / "data" / "prepared" / "moons.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=train, test=train[:50])
    return path


# ---------------------------------------------------------------- training


class _InfiniteGradient(torch.autograd.Function):
    """The identity whose backward pass returns an infinite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


class FaultyModel(nn.Module):
    """A velocity model that turns faulty from its call ``first_bad`` on (0-based, one call per step)."""

    def __init__(self, inner: nn.Module, first_bad: int, fault: str):
        super().__init__()
        self.inner = inner
        self.first_bad = first_bad
        self.fault = fault
        self.calls = 0

    def forward(self, x, t):
        v = self.inner(x, t)
        bad = self.calls >= self.first_bad
        self.calls += 1
        if bad and self.fault == "nan":
            return v * math.nan
        if bad and self.fault == "gradient":
            return _InfiniteGradient.apply(v)
        return v


@pytest.fixture
def faulty_training(tmp_path, monkeypatch):
    """Return ``train(first_bad, fault)``, which runs train@moons with a model that fails at that step."""
    write_params(tmp_path)
    write_moons(tmp_path)
    build_model = train_stage.build_model

    def train(first_bad: int, fault: str) -> None:
        monkeypatch.setattr(train_stage, "build_model", lambda config: FaultyModel(build_model(config), first_bad, fault))

    return tmp_path, train


def checkpoint_trainer(directory: Path) -> dict:
    return torch.load(directory / CHECKPOINT, map_location="cpu", weights_only=True)["trainer"]


def test_train_nan_loss_names_step(faulty_training, capsys):
    directory, make_faulty = faulty_training
    make_faulty(25, "nan")

    message = run_stage_expecting_error(train_stage.main, directory, capsys, "moons")

    assert "stopped at step 25" in message
    assert "the loss is nan" in message
    assert "train.lr" in message
    assert f"checkpoint (step 20) is kept in {CHECKPOINT}" in message
    assert not (directory / MODEL).exists()
    assert not (directory / "reports" / "timing" / "train_moons.json").exists()


def test_train_nan_keeps_finite_checkpoint(faulty_training, capsys):
    directory, make_faulty = faulty_training
    make_faulty(25, "nan")

    run_stage_expecting_error(train_stage.main, directory, capsys, "moons")
    trainer = checkpoint_trainer(directory)

    assert trainer["step"] == 20
    assert all(torch.isfinite(value).all() for value in trainer["model"].values())
    assert all(torch.isfinite(value).all() for value in trainer["ema"]["shadow"].values())


def test_train_infinite_gradient_names_step(faulty_training, capsys):
    directory, make_faulty = faulty_training
    make_faulty(13, "gradient")

    message = run_stage_expecting_error(train_stage.main, directory, capsys, "moons")

    assert "stopped at step 13" in message
    assert "the gradient norm is" in message
    assert "the loss is nan" not in message
    assert f"checkpoint (step 10) is kept in {CHECKPOINT}" in message
    assert not (directory / MODEL).exists()


def test_train_infinite_gradient_keeps_finite_weights(faulty_training, capsys):
    directory, make_faulty = faulty_training
    make_faulty(13, "gradient")

    run_stage_expecting_error(train_stage.main, directory, capsys, "moons")
    trainer = checkpoint_trainer(directory)

    assert trainer["step"] == 10
    assert all(torch.isfinite(value).all() for value in trainer["model"].values())


def test_train_first_step_nan_has_no_checkpoint(faulty_training, capsys):
    directory, make_faulty = faulty_training
    make_faulty(0, "nan")

    message = run_stage_expecting_error(train_stage.main, directory, capsys, "moons")

    assert "stopped at step 0" in message
    assert "no checkpoint was written" in message
    assert not (directory / CHECKPOINT).exists()


def test_train_nan_in_data_names_file_and_count(tmp_path, capsys):
    write_params(tmp_path)
    train = np.random.default_rng(0).standard_normal((300, 2)).astype(np.float32)
    train[[3, 7], 1] = np.nan
    train[11, 0] = np.inf
    write_moons(tmp_path, train)

    message = run_stage_expecting_error(train_stage.main, tmp_path, capsys, "moons")

    assert "data/prepared/moons.npz" in message
    assert "3 non-finite values" in message
    assert not (tmp_path / "data" / "models").exists()


# ---------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder with params.yaml and the prepared data sets of a tiny prepare run."""
    directory = tmp_path_factory.mktemp("prepared")
    write_params(directory)
    run_in_directory(prepare_stage.main, directory)
    return directory


def write_samples(directory: Path, sets: dict[str, np.ndarray]) -> Path:
    """Write data/samples/moons/ with one record per ``{solver}_nfe{budget}`` key of ``sets``."""
    folder = directory / "data" / "samples" / "moons"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "samples.npz", **sets)
    records = []
    for key in sets:
        solver, budget = key.split("_nfe")
        records.append({"solver": solver, "nfe_budget": int(budget), "nfe": int(budget), "steps": int(budget), "key": key})
    (folder / "manifest.json").write_text(json.dumps({"records": records}))
    return folder / "samples.npz"


def copy_prepared(prepared: Path, target: Path) -> Path:
    for path in [prepared / "params.yaml", *prepared.glob("data/prepared/*")]:
        destination = target / path.relative_to(prepared)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(path.read_bytes())
    return target


def test_evaluate_counts_non_finite_samples(prepared, trained, tmp_path, caplog):
    directory = copy_prepared(prepared, tmp_path)
    copy_model(trained, directory)
    good = np.random.default_rng(1).standard_normal((128, 2))
    bad = good.copy()
    bad[[0, 100], 0] = np.nan
    bad[5, 1] = -np.inf
    write_samples(directory, {"euler_nfe8": bad, "rk4_nfe8": good})

    with caplog.at_level(logging.WARNING, logger="flowmatch.evaluate"):
        run_in_directory(evaluate_stage.main, directory, "moons")

    assert "euler_nfe8: 3 of 128 samples contain NaN or infinite values" in caplog.text
    metrics = json.loads((directory / "reports" / "metrics" / "moons.json").read_text())
    assert metrics["by_solver"]["euler"]["nfe8"]["w2"] is None
    assert metrics["solver"] == "rk4"


def test_evaluate_all_non_finite_exits(prepared, trained, tmp_path, capsys):
    directory = copy_prepared(prepared, tmp_path)
    copy_model(trained, directory)
    write_samples(directory, {"euler_nfe8": np.full((64, 2), np.nan)})

    message = run_stage_expecting_error(evaluate_stage.main, directory, capsys, "moons")

    assert "NaN or infinite" in message
    assert not (directory / "reports" / "metrics" / "moons.json").exists()


# ---------------------------------------------------------------- corrupt input files


def test_train_truncated_data_names_file(tmp_path, capsys):
    write_params(tmp_path)
    path = write_moons(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])

    message = run_stage_expecting_error(train_stage.main, tmp_path, capsys, "moons")

    assert "data/prepared/moons.npz: cannot read the file" in message
    assert not (tmp_path / "data" / "models").exists()


def test_train_altered_data_names_file(tmp_path, capsys):
    write_params(tmp_path)
    path = write_moons(tmp_path)
    np.savez(path, test=np.zeros((5, 2), dtype=np.float32))

    message = run_stage_expecting_error(train_stage.main, tmp_path, capsys, "moons")

    assert "data/prepared/moons.npz: no 'train' array" in message


def write_misfit_checkpoint(directory: Path) -> None:
    """Write a checkpoint with the fingerprint train@moons expects but a model of another width."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        params = load_params()
        settings = params.train.for_dataset("moons")
        expected = train_stage.fingerprint("moons", params, settings, 1, Path("data/prepared/moons.npz"))
    config = train_stage.model_config(settings, (2,), "moons") | {"hidden": settings.hidden * 2}
    trainer = train_stage.Trainer(
        train_stage.build_model(config),
        params.schedule.build(),
        train_stage.TrainSettings(steps=30, batch_size=32, lr=1e-3, warmup_steps=5, grad_clip=1.0, ema_decay=0.9),
        seed=params.seed,
    )
    path = directory / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": expected, "trainer": trainer.state_dict(), "history": []}, path)


def test_train_misfit_checkpoint_names_file(tmp_path, capsys):
    write_params(tmp_path)
    write_moons(tmp_path)
    write_misfit_checkpoint(tmp_path)

    message = run_stage_expecting_error(train_stage.main, tmp_path, capsys, "moons")

    assert str(CHECKPOINT) in message
    assert not (tmp_path / MODEL).exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding data/models/moons/model.pt of a 30-step training run."""
    directory = tmp_path_factory.mktemp("trained")
    write_params(directory)
    write_moons(directory)
    run_in_directory(train_stage.main, directory, "moons")
    return directory


def copy_model(trained: Path, target: Path) -> Path:
    (target / MODEL).parent.mkdir(parents=True, exist_ok=True)
    (target / "params.yaml").write_bytes((trained / "params.yaml").read_bytes())
    (target / MODEL).write_bytes((trained / MODEL).read_bytes())
    return target / MODEL


def test_sample_truncated_model_names_file(trained, tmp_path, capsys):
    path = copy_model(trained, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    message = run_stage_expecting_error(sample_stage.main, tmp_path, capsys, "moons")

    assert f"{MODEL}: cannot read the model" in message
    assert not (tmp_path / "data" / "samples").exists()


def test_sample_misfit_weights_names_file(trained, tmp_path, capsys):
    path = copy_model(trained, tmp_path)
    contents = torch.load(path, weights_only=True)
    contents["config"]["hidden"] *= 2
    torch.save(contents, path)

    message = run_stage_expecting_error(sample_stage.main, tmp_path, capsys, "moons")

    assert f"{MODEL}: cannot read the model" in message
    assert "size mismatch" in message
    assert not (tmp_path / "data" / "samples").exists()


def test_evaluate_wrong_sample_shape_names_file(prepared, trained, tmp_path, capsys):
    directory = copy_prepared(prepared, tmp_path)
    copy_model(trained, directory)
    path = write_samples(directory, {"euler_nfe8": np.zeros((64, 3)), "rk4_nfe8": np.zeros((64, 2))})

    message = run_stage_expecting_error(evaluate_stage.main, directory, capsys, "moons")

    assert str(path.relative_to(directory)) in message
    assert "euler_nfe8" in message
    assert "(64, 3)" in message
    assert not (directory / "reports" / "metrics" / "moons.json").exists()
