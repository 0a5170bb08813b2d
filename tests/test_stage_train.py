"""Tests of the train stage: outputs, DVCLive log, resume after an interruption, DDP, rejected inputs."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import flowmatch.training
from stage_utils import copy_params, run_in_directory, run_python_module, run_stage_expecting_error
from stages import train as train_stage
from stages.common import ParamError
from stages.config import parse_params

REPO = Path(__file__).resolve().parents[1]

TINY_TRAIN = {
    "steps": 30,
    "batch_size": 32,
    "hidden": 16,
    "layers": 2,
    "warmup_steps": 5,
    "log_every": 5,
    "checkpoint_every": 10,
    "device": "cpu",
}


def write_params(directory: Path, **train_overrides) -> None:
    """Write the repository's params.yaml into ``directory`` with a tiny ``train`` section."""
    copy_params(directory, {"train": {**TINY_TRAIN, **train_overrides}})


def write_gaussian_data(directory: Path, n: int = 256) -> None:
    generator = np.random.default_rng(0)
    train = (generator.standard_normal((n, 2)) * [0.5, 0.3] + [1.0, -0.5]).astype(np.float32)
    (directory / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    np.savez(directory / "data" / "prepared" / "gaussian.npz", train=train, test=train[:16])


def run_train(directory: Path, dataset: str = "gaussian") -> None:
    run_in_directory(train_stage.main, directory, dataset)


def read_loss_log(directory: Path, dataset: str = "gaussian") -> list[tuple[int, float]]:
    lines = (directory / "reports" / "train" / dataset / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss"]
    return [(int(step), float(loss)) for step, loss in (line.split("\t") for line in lines[1:])]


def load_weights(directory: Path, dataset: str = "gaussian") -> dict:
    return torch.load(directory / "data" / "models" / dataset / "model.pt", weights_only=True)


@pytest.fixture
def workdir(tmp_path):
    write_params(tmp_path)
    write_gaussian_data(tmp_path)
    return tmp_path


def test_train_writes_model_and_timing(workdir):
    run_train(workdir)

    contents = load_weights(workdir)
    assert contents["step"] == 30
    assert contents["config"]["kind"] == "mlp"
    assert contents["schedule"]["name"] == "cosine"
    timing = json.loads((workdir / "reports" / "timing" / "train_gaussian.json").read_text())
    assert set(timing) == {"seconds", "steps", "start_step", "steps_per_second", "samples_per_second"}
    assert timing["steps"] == 30


def test_train_logs_every_n_steps(workdir):
    run_train(workdir)

    steps = [step for step, _ in read_loss_log(workdir)]
    assert steps == [5, 10, 15, 20, 25, 30]
    metrics_dir = workdir / "reports" / "train" / "gaussian" / "plots" / "metrics"
    assert {path.name for path in metrics_dir.iterdir()} == {"loss.tsv", "lr.tsv"}


def test_train_dvclive_writes_no_dvc_files(workdir):
    run_train(workdir)

    assert not list(workdir.rglob("dvc.yaml"))
    assert not (workdir / ".dvc").exists()
    assert not (workdir / ".git").exists()


def test_train_removes_checkpoint_after_success(workdir):
    run_train(workdir)

    assert not (workdir / "data" / "checkpoints" / "gaussian").exists()


class Interrupted(Exception):
    """Stands in for a kill signal in the middle of training."""


def interrupt_at(monkeypatch, stop_step: int) -> None:
    original = flowmatch.training.Trainer.step

    def step(self, z):
        if self.step_count == stop_step:
            raise Interrupted
        return original(self, z)

    monkeypatch.setattr(flowmatch.training.Trainer, "step", step)


def test_train_resume_matches_uninterrupted(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for directory in (straight, resumed):
        directory.mkdir()
        write_params(directory, coupling="minibatch_ot")
        write_gaussian_data(directory)
    run_train(straight)

    with monkeypatch.context() as patch:
        interrupt_at(patch, 17)
        with pytest.raises(Interrupted):
            run_train(resumed)
    checkpoint = torch.load(resumed / "data" / "checkpoints" / "gaussian" / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["step"] == 10
    run_train(resumed)

    expected, actual = load_weights(straight), load_weights(resumed)
    for part in ("model", "ema"):
        for name, value in expected[part].items():
            assert torch.equal(value, actual[part][name]), f"{part}.{name}"
    assert read_loss_log(resumed) == read_loss_log(straight)


def test_train_restarts_when_params_change(workdir, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 12)
        with pytest.raises(Interrupted):
            run_train(workdir)
    write_params(workdir, lr=0.005)

    with caplog.at_level(logging.INFO, logger="flowmatch.train"):
        run_train(workdir)
    assert "training starts over" in caplog.text
    assert "resuming" not in caplog.text
    assert json.loads((workdir / "reports" / "timing" / "train_gaussian.json").read_text())["start_step"] == 0


def test_train_non_finite_loss_names_step(workdir, capsys):
    write_params(workdir, lr=1.0e12, grad_clip=0.0, warmup_steps=0)

    message = run_stage_expecting_error(train_stage.main, workdir, capsys, "gaussian")
    assert "stopped at step" in message
    assert not (workdir / "data" / "models").exists()
    # The partial DVCLive log is deleted with its temporary directory.
    assert list((workdir / "reports" / "train").iterdir()) == []


def test_train_unknown_dataset_exits(workdir, capsys):
    message = run_stage_expecting_error(train_stage.main, workdir, capsys, "mnist")

    assert "mnist" in message
    assert not (workdir / "data" / "models").exists()
    assert not (workdir / "reports").exists()


def test_train_negative_steps_exits(workdir, capsys):
    write_params(workdir, steps=-3)

    message = run_stage_expecting_error(train_stage.main, workdir, capsys, "gaussian")
    assert "'train.steps'" in message
    assert not (workdir / "reports").exists()


def test_train_unet_on_vectors_exits(workdir, capsys):
    write_params(workdir, model="unet")

    message = run_stage_expecting_error(train_stage.main, workdir, capsys, "gaussian")
    assert "'train.model'" in message
    assert not (workdir / "reports").exists()


def test_train_missing_data_exits(tmp_path, capsys):
    write_params(tmp_path)

    message = run_stage_expecting_error(train_stage.main, tmp_path, capsys, "moons")
    assert "data/prepared/moons.npz" in message


@pytest.fixture
def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_overrides_apply_to_one_dataset(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["train"]["overrides"] = {"digits": {"steps": 1234, "model": "unet"}}

    params = parse_params(raw)
    assert params.train.for_dataset("digits").steps == 1234
    assert params.train.for_dataset("digits").model == "unet"
    assert params.train.for_dataset("digits").lr == params.train.lr
    assert params.train.for_dataset("moons").steps == raw["train"]["steps"]


def test_override_error_names_override_key(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["train"]["overrides"] = {"digits": {"lr": -1.0}}

    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    assert caught.value.key == "train.overrides.digits.lr"


def test_override_unknown_dataset_raises(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["train"]["overrides"] = {"svhn": {"steps": 5}}

    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    assert caught.value.key == "train.overrides.svhn"


def test_override_of_nproc_raises(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["train"]["overrides"] = {"digits": {"nproc": 2}}

    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    assert caught.value.key == "train.overrides.digits.nproc"


def test_batch_not_divisible_by_nproc_raises(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["train"].update({"nproc": 3, "batch_size": 64})

    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    assert caught.value.key == "train.batch_size"


def test_ddp_two_processes_match_one(tmp_path):
    # Two Gloo processes with 64 examples each against one process with all 128. The
    # data order is the same, but the noise and times are drawn per rank, so the loss
    # curves agree only up to sampling noise. Each logged value averages 30 steps x 128
    # examples. In 8 pairs of single-process runs that differ only in the noise seed, the
    # logged values differed by at most 7% and by 3.6% on average. The bounds are twice that.
    single, double = tmp_path / "single", tmp_path / "double"
    settings = {"steps": 150, "batch_size": 128, "log_every": 30, "warmup_steps": 10, "lr": 0.005}
    for directory, nproc in ((single, 1), (double, 2)):
        directory.mkdir()
        write_params(directory, nproc=nproc, **settings)
        write_gaussian_data(directory, n=2048)
    completed = run_python_module("stages.train", double, "gaussian", timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    run_train(single)

    assert "all 2 ranks have identical weights" in completed.stderr
    one = read_loss_log(single)
    two = read_loss_log(double)
    assert [step for step, _ in two] == [step for step, _ in one]
    relative = [abs(loss_two / loss_one - 1) for (_, loss_one), (_, loss_two) in zip(one, two)]
    assert max(relative) < 0.15
    assert sum(relative) / len(relative) < 0.075
    assert json.loads((double / "reports" / "timing" / "train_gaussian.json").read_text())["steps"] == 150
