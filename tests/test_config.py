"""Validation of params.yaml: every invalid value is named with its key and the accepted values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.common import ParamError, StageError
from stages.config import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_are_valid(raw):
    params = parse_params(raw)
    assert params.schedule.name == "cosine"
    assert params.schedule.build().name == "cosine"


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("schedule",), "nonsense", "schedule"),
        (("schedules", "polynomial_n"), 0, "schedules.polynomial_n"),
        (("schedules", "vp_beta_max"), 0.05, "schedules.vp_beta_max"),
        (("seed",), -1, "seed"),
        (("seed",), "zero", "seed"),
        (("data", "n_train"), -5, "data.n_train"),
        (("data", "n_train"), 3.5, "data.n_train"),
        (("single_point", "solvers"), ["euler", "leapfrog"], "single_point.solvers[1]"),
        (("single_point", "t_grid"), [0.5, 1.0], "single_point.t_grid[1]"),
        (("train", "steps"), True, "train.steps"),
        (("train", "lr"), float("nan"), "train.lr"),
        (("sample", "nfe"), [], "sample.nfe"),
        (("sample", "schedule"), "cosinus", "sample.schedule"),
    ],
)
def test_invalid_value_names_key(raw, path, value, key):
    broken = copy.deepcopy(raw)
    section = broken
    for name in path[:-1]:
        section = section[name]
    section[path[-1]] = value

    with pytest.raises(ParamError) as caught:
        parse_params(broken)

    message = str(caught.value)
    assert caught.value.key == key
    assert f"'{key}'" in message
    assert "\n" not in message


def test_unknown_schedule_lists_accepted_names(raw):
    raw["schedule"] = "nonsense"
    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    for name in ("linear", "cosine", "polynomial", "linear_vp", "vp"):
        assert name in caught.value.accepted


def test_vp_beta_order_names_both_keys(raw):
    raw["schedules"]["vp_beta_min"] = 30.0

    with pytest.raises(ParamError) as caught:
        parse_params(raw)

    message = str(caught.value)
    assert "'schedules.vp_beta_max': 20.0" in message
    assert "schedules.vp_beta_min = 30" in message
    assert "lower vp_beta_min or raise vp_beta_max" in message


def test_unknown_key_is_rejected(raw):
    raw["train"]["stpes"] = 10
    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    assert caught.value.key == "train.stpes"


def test_missing_key_is_rejected(raw):
    del raw["sample"]["n_samples"]
    with pytest.raises(ParamError) as caught:
        parse_params(raw)
    assert caught.value.key == "sample.n_samples"


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("schedule: [cosine\nseed: 0\n")
    with pytest.raises(StageError) as caught:
        load_params(path)
    assert "\n" not in str(caught.value)
    assert "params.yaml" in str(caught.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(StageError, match="cannot read"):
        load_params(tmp_path / "params.yaml")
