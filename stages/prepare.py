"""Stage `prepare`: draw the toy sets and the Gaussian case, split the digit images.

Writes ``data/prepared/NAME.npz`` for every name in ``BUILTIN_DATASETS``, for each image
set named in ``data.datasets`` (MNIST, Fashion-MNIST, CIFAR-10 in their official
splits, read by torchvision from ``data.data_root``), and
``data/prepared/manifest.json``. The manifest records for each set its shape, split
sizes, kind, and the affine map ``data = (raw - center) / scale`` from the raw values.
Toy entries also record their sampler options, so later stages can draw fresh
independent points from the same distribution (``make_toy(**entry["sampler"])``).

NOTE: the files under ``data.data_root`` are not a DVC dependency, so replacing them
does not rerun the stage. They are fixed releases, and torchvision checks the
CIFAR-10 files against its MD5 sums (it has none for the unpacked MNIST files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from flowmatch.datasets import (
    DIGITS_CLASSES,
    DIGITS_MAX_LEVEL,
    TOY_NAMES,
    load_digits_split,
    make_rng,
    make_toy,
    random_gaussian,
    sample_gaussian,
)
from flowmatch.image_datasets import IMAGE_SOURCES, PIXEL_MAX, ImageFilesInvalidError, ImageFilesNotFoundError, load_image_split
from stages.common import StageError, run_stage, save_npz, write_json
from stages.config import DataParams, load_params

log = logging.getLogger("flowmatch.prepare")

PREPARED_DIR = Path("data/prepared")


def toy_options(name: str, data: DataParams) -> dict:
    """Return the ``make_toy`` options of toy ``name`` taken from the ``data`` parameters."""
    if name == "moons":
        return {"noise": data.moons_noise}
    if name == "checkerboard":
        return {"cells": data.checkerboard_cells}
    return {"std": data.eight_gaussians_std}


def prepare_toy(name: str, data: DataParams, seed: int) -> tuple[dict, dict]:
    """Draw independent train and test sets of toy ``name`` and return its arrays and manifest entry."""
    toy = make_toy(name, **toy_options(name, data))
    train = toy.sample(data.n_train, make_rng(seed, name, "train"))
    test = toy.sample(data.n_test, make_rng(seed, name, "test"))
    arrays = {"train": train.astype(np.float32), "test": test.astype(np.float32)}
    entry = {
        "kind": "toy",
        "shape": [2],
        "n_train": data.n_train,
        "n_test": data.n_test,
        "center": toy.center.tolist(),
        "scale": toy.scale,
        "sampler": {"name": name, **toy.options},
    }
    return arrays, entry


def prepare_gaussian(data: DataParams, seed: int) -> tuple[dict, dict]:
    """Draw ``N(mean, cov)`` parameters from ``seed``, then independent train and test sets."""
    mean, cov = random_gaussian(data.gaussian_dim, make_rng(seed, "gaussian", "parameters"))
    train = sample_gaussian(mean, cov, data.n_train, make_rng(seed, "gaussian", "train"))
    test = sample_gaussian(mean, cov, data.n_test, make_rng(seed, "gaussian", "test"))
    arrays = {"train": train.astype(np.float32), "test": test.astype(np.float32), "mean": mean, "cov": cov}
    entry = {
        "kind": "gaussian",
        "shape": [data.gaussian_dim],
        "n_train": data.n_train,
        "n_test": data.n_test,
        "center": 0.0,
        "scale": 1.0,
    }
    return arrays, entry


def prepare_digits(data: DataParams, seed: int) -> tuple[dict, dict]:
    """Split the digit images, stratified by class, into train and held-out test."""
    split = load_digits_split(data.digits_test_fraction, seed)
    arrays = {"train": split.train, "test": split.test, "train_labels": split.train_labels, "test_labels": split.test_labels}
    entry = {
        "kind": "image",
        "shape": list(split.train.shape[1:]),
        "n_train": len(split.train),
        "n_test": len(split.test),
        "center": DIGITS_MAX_LEVEL / 2.0,
        "scale": DIGITS_MAX_LEVEL / 2.0,
        "n_classes": DIGITS_CLASSES,
    }
    return arrays, entry


def prepare_image_dataset(name: str, data: DataParams) -> tuple[dict, dict]:
    """Read image set ``name`` from ``data.data_root`` with torchvision; raise ``StageError`` when that fails."""
    source = IMAGE_SOURCES[name]
    try:
        split = load_image_split(name, data.data_root, download=data.download)
    except ImageFilesNotFoundError as error:
        raise StageError(f"{error}; place them there or set data.download: true") from error
    except ImageFilesInvalidError as error:
        raise StageError(f"{error}; replace the files, or delete them and set data.download: true") from error
    except OSError as error:
        raise StageError(f"{source.class_name}: download into {data.data_root} failed ({error}); place the files there by hand and set data.download: false") from error
    arrays = {"train": split.train, "test": split.test, "train_labels": split.train_labels, "test_labels": split.test_labels}
    entry = {
        "kind": "image",
        "shape": list(split.train.shape[1:]),
        "n_train": len(split.train),
        "n_test": len(split.test),
        "center": PIXEL_MAX / 2.0,
        "scale": PIXEL_MAX / 2.0,
        "n_classes": source.n_classes,
        "source": f"torchvision.datasets.{source.class_name}",
    }
    return arrays, entry


def main() -> None:
    params = load_params()
    data, seed = params.data, params.seed

    prepared = {name: prepare_toy(name, data, seed) for name in TOY_NAMES}
    prepared["gaussian"] = prepare_gaussian(data, seed)
    prepared["digits"] = prepare_digits(data, seed)
    for name in data.image_datasets:
        log.info("reading %s from %s with torchvision", name, data.data_root)
        prepared[name] = prepare_image_dataset(name, data)

    manifest = {}
    for name, (arrays, entry) in prepared.items():
        path = PREPARED_DIR / f"{name}.npz"
        save_npz(path, **arrays)
        manifest[name] = entry
        log.info("wrote %s: %d train and %d test points of shape %s", path, entry["n_train"], entry["n_test"], tuple(entry["shape"]))
    write_json(PREPARED_DIR / "manifest.json", manifest)


if __name__ == "__main__":
    run_stage(main)
