"""Tests of tools/params_overlay.py and of the example partial params files in params/."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import parse_params

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "params_overlay.py"
sys.path.insert(0, str(REPO / "tools"))

from params_overlay import OverlayError, format_value, leaves, overlay_arguments  # noqa: E402

EXAMPLES = sorted((REPO / "params").glob("*.yaml"))


def merged(params: dict, overlay: dict) -> dict:
    """Return ``params`` with every leaf of ``overlay`` set, as ``dvc exp run -S`` sets them."""
    result = copy.deepcopy(params)
    for dotted, value in leaves(overlay):
        node = result
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return result


def test_existing_key_plain_new_key_added():
    params = {"data": {"datasets": ["moons"]}, "train": {"overrides": {}}}
    overlay = {"data": {"datasets": ["moons", "mnist"]}, "train": {"overrides": {"mnist": {"lr": 0.0005}}}}

    assert overlay_arguments(overlay, params) == ["-S", "data.datasets=[moons,mnist]", "-S", "++train.overrides.mnist.lr=0.0005"]


@pytest.mark.parametrize(
    ("value", "text"),
    [([1, 2], "[1,2]"), (True, "true"), (None, "null"), ("data/raw", "data/raw"), (1e-05, "1.0e-05"), ({}, "{}"), ({"a": [1]}, "{a:[1]}"), ("yes", "'yes'")],
)
def test_format_value_flow_style(value, text):
    assert format_value(value, "key") == text


def test_whitespace_value_rejected():
    with pytest.raises(OverlayError, match="'noise_sequence.image' contains whitespace"):
        overlay_arguments({"noise_sequence": {"image": "my cat.png"}}, {})


def test_tool_empty_file_exits(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    result = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "empty.yaml")], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'empty.yaml'}: expected a non-empty mapping of params.yaml keys"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_gives_valid_params(path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = yaml.safe_load(path.read_text())

    parsed = parse_params(merged(params, overlay))

    assert parsed.data.datasets == tuple(overlay["data"]["datasets"])


def test_mnist_example_trains_unet():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = yaml.safe_load((REPO / "params" / "mnist_gpu.yaml").read_text())

    settings = parse_params(merged(params, overlay)).train.for_dataset("mnist")

    assert settings.model == "unet"
    assert settings.device == "cuda"
