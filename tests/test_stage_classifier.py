"""Tests of the classifier stage: held-out accuracy, features, determinism, failures that name their cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flowmatch.datasets import load_digits_split
from stage_utils import copy_params, run_in_directory
from stages import classifier
from stages.common import StageError, save_npz
from stages.config import ClassifierParams


def write_project(directory: Path, **classifier_overrides) -> None:
    """Write params.yaml with ``classifier`` overrides and the prepared digit split into ``directory``."""
    copy_params(directory, {"classifier": classifier_overrides})
    params = yaml.safe_load((directory / "params.yaml").read_text())
    split = load_digits_split(params["data"]["digits_test_fraction"], params["seed"])
    save_npz(
        directory / "data" / "prepared" / "digits.npz",
        train=split.train,
        test=split.test,
        train_labels=split.train_labels,
        test_labels=split.test_labels,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("classifier")
    write_project(directory)
    run_in_directory(classifier.main, directory)
    return directory


def test_classifier_heldout_accuracy(trained):
    report = json.loads((trained / "reports" / "metrics" / "classifier.json").read_text())
    assert report["accuracy"] >= 0.95
    assert report["n_test"] == 450


def test_classifier_saved_model_reproduces_accuracy(trained):
    model = classifier.load_classifier(trained / "data" / "models" / "classifier.pt")
    with np.load(trained / "data" / "prepared" / "digits.npz") as archive:
        value = classifier.accuracy(model, archive["test"], archive["test_labels"])
    report = json.loads((trained / "reports" / "metrics" / "classifier.json").read_text())
    assert value == report["accuracy"]


def test_classifier_features_shape(trained):
    model = classifier.load_classifier(trained / "data" / "models" / "classifier.pt")
    features, labels = classifier.classify(model, np.zeros((5, 1, 8, 8), dtype=np.float32))
    assert features.shape == (5, 128)
    assert labels.shape == (5,)
    assert (features >= 0.0).all()


def test_classifier_timing_written(trained):
    timing = json.loads((trained / "reports" / "timing" / "classifier.json").read_text())
    assert set(timing) == {"seconds", "steps_per_second"}


def test_train_classifier_deterministic():
    split = load_digits_split(0.25, seed=0)
    config = ClassifierParams(epochs=1, batch_size=64, lr=0.001, features=16, min_accuracy=0.0)
    first, _, _ = classifier.train_classifier(split.train[:256], split.train_labels[:256], config, seed=3)
    second, _, _ = classifier.train_classifier(split.train[:256], split.train_labels[:256], config, seed=3)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_classifier_below_min_accuracy(tmp_path, monkeypatch):
    write_project(tmp_path, epochs=1, min_accuracy=1.0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="classifier.min_accuracy"):
        classifier.main()
    assert not (tmp_path / "data" / "models" / "classifier.pt").exists()


def test_load_classifier_truncated_file(trained, tmp_path):
    data = (trained / "data" / "models" / "classifier.pt").read_bytes()
    truncated = tmp_path / "classifier.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError, match="classifier.pt: cannot read"):
        classifier.load_classifier(truncated)


def test_load_classifier_missing_file(tmp_path):
    with pytest.raises(StageError, match="file not found"):
        classifier.load_classifier(tmp_path / "absent.pt")
