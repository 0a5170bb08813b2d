"""Tests of flowmatch.image_datasets on tiny files in the real MNIST and CIFAR-10 formats.

The files are written here: idx-ubyte files (gzipped, as MNIST and Fashion-MNIST are
distributed) and CIFAR-10's pickled batches. They are read through torchvision's
data set classes, through the prepare stage, and in one slow test through
``dvc exp run`` with the example params file params/mnist_gpu.yaml.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import yaml

from flowmatch.image_datasets import (
    IMAGE_SOURCES,
    ImageFilesInvalidError,
    ImageFilesNotFoundError,
    load_image_split,
    missing_files,
    scale_pixels,
)
from flowmatch.models import UNet
from flowmatch.schedules import get_schedule
from flowmatch.training import Trainer, TrainSettings
from stages import prepare
from stages.common import ParamError
from stages.config import parse_params

REPO = Path(__file__).resolve().parents[1]

N_TRAIN = 12
N_TEST = 6


def tiny_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` random uint8 images of ``shape`` and labels ``0..9``, the first image all 0 and the second all 255."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    return images, labels


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write a uint8 array in the idx-ubyte format: magic 0x0000 08 ndim, big-endian sizes, the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_files(root: Path, name: str, compress: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny train and test split of ``name`` (mnist or fashion_mnist) under ``root``; return the arrays."""
    folder = root / IMAGE_SOURCES[name].folder
    folder.mkdir(parents=True)
    train, train_labels = tiny_images(N_TRAIN, (28, 28), seed=1)
    test, test_labels = tiny_images(N_TEST, (28, 28), seed=2)
    write_idx(folder / "train-images-idx3-ubyte", train, compress)
    write_idx(folder / "train-labels-idx1-ubyte", train_labels, compress)
    write_idx(folder / "t10k-images-idx3-ubyte", test, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels, compress)
    return {"train": train, "train_labels": train_labels, "test": test, "test_labels": test_labels}


def write_cifar_files(root: Path) -> dict[str, np.ndarray]:
    """Write CIFAR-10's python batches: five train batches of 2 images, a test batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    # CIFAR-10 rows are 3072 bytes: the red plane, then green, then blue, each 32 x 32 row-major.
    train, train_labels = tiny_images(10, (3, 32, 32), seed=3)
    test, test_labels = tiny_images(N_TEST, (3, 32, 32), seed=4)
    for batch in range(5):
        rows = slice(2 * batch, 2 * batch + 2)
        entry = {"batch_label": f"training batch {batch + 1} of 5", "labels": train_labels[rows].tolist(), "data": train[rows].reshape(2, -1)}
        with open(folder / f"data_batch_{batch + 1}", "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(), "data": test.reshape(N_TEST, -1)}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}, handle)
    return {"train": train, "train_labels": train_labels, "test": test, "test_labels": test_labels}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """Tiny CIFAR-10 files, with torchvision's MD5 table pointed at them (it lists the official files' sums)."""
    arrays = write_cifar_files(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, md5(folder / name)] for name, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[name, md5(folder / name)] for name, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5(folder / "batches.meta")})
    return tmp_path, arrays


# ---------------------------------------------------------------- the files and torchvision


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files_read_by_torchvision(tmp_path, name):
    arrays = write_mnist_files(tmp_path, name, compress=False)
    dataset_class = getattr(torchvision.datasets, IMAGE_SOURCES[name].class_name)
    dataset = dataset_class(root=str(tmp_path), train=False, download=False)

    assert np.array_equal(dataset.data.numpy(), arrays["test"])
    assert np.array_equal(dataset.targets.numpy(), arrays["test_labels"])


def test_cifar_files_read_by_torchvision(cifar_root):
    root, arrays = cifar_root
    dataset = torchvision.datasets.CIFAR10(root=str(root), train=True, download=False)

    assert np.array_equal(dataset.data, arrays["train"].transpose(0, 2, 3, 1))
    assert dataset.targets == arrays["train_labels"].tolist()
    assert dataset.classes[3] == "cat"


# ---------------------------------------------------------------- load_image_split


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_gzip_split_scaled(tmp_path, name):
    arrays = write_mnist_files(tmp_path, name, compress=True)
    split = load_image_split(name, tmp_path)

    assert split.train.shape == (N_TRAIN, 1, 28, 28)
    assert split.train.dtype == np.float32
    assert np.array_equal(split.train[:, 0], scale_pixels(arrays["train"]))
    assert np.array_equal(split.test_labels, arrays["test_labels"].astype(np.int64))
    assert split.test_labels.dtype == np.int64


def test_scale_pixels_endpoints():
    scaled = scale_pixels(np.array([0, 255, 51], dtype=np.uint8))

    assert scaled[0] == -1.0
    assert scaled[1] == 1.0
    assert scaled[2] == pytest.approx(51 / 127.5 - 1.0)


def test_mnist_gzip_unpacked_beside_archive(tmp_path):
    write_mnist_files(tmp_path, "mnist", compress=True)
    load_image_split("mnist", tmp_path)

    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert not list((tmp_path / "MNIST" / "raw").glob(".*partial"))


def test_cifar_split_channel_order(cifar_root):
    root, arrays = cifar_root
    split = load_image_split("cifar10", root)

    assert split.train.shape == (10, 3, 32, 32)
    assert split.test.shape == (N_TEST, 3, 32, 32)
    # Channel 0 is the red plane of each row, so the layout (n, 3, 32, 32) matches the rows as written.
    assert np.array_equal(split.train, scale_pixels(arrays["train"]))
    assert np.array_equal(split.test_labels, arrays["test_labels"].astype(np.int64))


def test_missing_files_one_line_message(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"")

    with pytest.raises(ImageFilesNotFoundError) as raised:
        load_image_split("mnist", tmp_path)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"MNIST: files not found under {folder}: ")
    assert "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)" in message
    assert "train-images" not in message


def test_missing_files_lists_cifar_batches(tmp_path):
    assert missing_files("cifar10", tmp_path) == list(IMAGE_SOURCES["cifar10"].files)


def test_cifar_checksum_mismatch_names_files(tmp_path):
    # Without the patched MD5 table the tiny files fail torchvision's official sums.
    write_cifar_files(tmp_path)

    with pytest.raises(ImageFilesInvalidError, match="fail torchvision's MD5 check.*data_batch_1, data_batch_2"):
        load_image_split("cifar10", tmp_path)


def test_truncated_idx_file_is_invalid(tmp_path):
    write_mnist_files(tmp_path, "mnist", compress=False)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(ImageFilesInvalidError, match="MNIST: torchvision could not read"):
        load_image_split("mnist", tmp_path)


def test_garbage_idx_file_gives_reason(tmp_path):
    write_mnist_files(tmp_path, "mnist", compress=False)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"garbage")

    with pytest.raises(ImageFilesInvalidError) as caught:
        load_image_split("mnist", tmp_path)

    message = str(caught.value)
    assert "MNIST: torchvision could not read" in message
    assert not message.endswith(": )")
    assert "Error: " in message


def test_unknown_image_dataset_raises(tmp_path):
    with pytest.raises(ValueError, match="accepted: mnist, fashion_mnist, cifar10"):
        load_image_split("svhn", tmp_path)


# ---------------------------------------------------------------- parameters and the prepare stage


def raw_params(**data) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update({"n_train": 300, "n_test": 200, **data})
    return raw


def test_default_params_prepare_no_image_set():
    assert parse_params(raw_params()).data.image_datasets == ()


def test_datasets_unknown_name_rejected():
    with pytest.raises(ParamError, match=r"'data\.datasets\[1\]': 'mnsit'"):
        parse_params(raw_params(datasets=["moons", "mnsit"]))


def test_image_datasets_keep_listed_order():
    data = parse_params(raw_params(datasets=["cifar10", "moons", "mnist"])).data

    assert data.image_datasets == ("cifar10", "mnist")


def test_prepare_writes_mnist_npz(tmp_path, monkeypatch):
    arrays = write_mnist_files(tmp_path / "raw", "mnist")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(datasets=["moons", "mnist"], data_root=str(tmp_path / "raw"))))
    monkeypatch.chdir(tmp_path)
    prepare.main()

    with np.load(tmp_path / "data" / "prepared" / "mnist.npz") as archive:
        assert archive["train"].shape == (N_TRAIN, 1, 28, 28)
        assert archive["train"].dtype == np.float32
        assert np.array_equal(archive["test"][:, 0], scale_pixels(arrays["test"]))
        assert np.array_equal(archive["train_labels"], arrays["train_labels"].astype(np.int64))
    entry = json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())["mnist"]
    assert entry["kind"] == "image"
    assert entry["shape"] == [1, 28, 28]
    assert entry["n_test"] == N_TEST


def test_prepare_writes_cifar_npz(cifar_root, tmp_path, monkeypatch):
    root, arrays = cifar_root
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(datasets=["cifar10"], data_root=str(root))))
    monkeypatch.chdir(tmp_path)
    prepare.main()

    with np.load(tmp_path / "data" / "prepared" / "cifar10.npz") as archive:
        assert archive["train"].shape == (10, 3, 32, 32)
        assert np.array_equal(archive["train"], scale_pixels(arrays["train"]))


def test_prepare_offline_missing_files_exits(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(datasets=["moons", "fashion_mnist"], data_root="raw")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2
    assert errors == [
        f"error: FashionMNIST: files not found under {tmp_path / 'raw' / 'FashionMNIST' / 'raw'}: train-images-idx3-ubyte(.gz), "
        "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz); "
        "place them there or set data.download: true"
    ]
    assert not (tmp_path / "data" / "prepared").exists()


# ---------------------------------------------------------------- the U-Net on these shapes


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_unet_trains_on_image_shape(shape):
    torch.manual_seed(0)
    # Two smooth patterns: a learnable target, unlike independent random pixels whose
    # optimal loss stays near the initial one.
    rows = torch.linspace(-1, 1, shape[1])[:, None]
    columns = torch.linspace(-1, 1, shape[2])[None, :]
    patterns = torch.stack([torch.sin(3 * rows + 2 * columns), torch.cos(2 * rows * columns)])
    images = patterns[torch.arange(16) % 2][:, None].expand(16, *shape).contiguous()
    model = UNet(shape, channels=8)
    settings = TrainSettings(steps=40, batch_size=16, lr=3e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.9)
    trainer = Trainer(model, get_schedule("linear"), settings, seed=0)
    losses = [trainer.step(images) for _ in range(settings.steps)]

    assert all(np.isfinite(losses))
    # With random times the loss of one step is noisy; compare means of ten steps.
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


# ---------------------------------------------------------------- dvc exp run with the example params file


@pytest.mark.slow
def test_exp_run_trains_mnist_from_example(tmp_path):
    from pipeline_utils import DVC, copy_project, init_git, run

    root = copy_project(tmp_path / "repo")
    init_git(root)
    write_mnist_files(tmp_path / "raw", "mnist")
    overlay = subprocess.run(
        [sys.executable, str(REPO / "tools" / "params_overlay.py"), "params/mnist_gpu.yaml"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    # The example's GPU settings, shrunk to a few CPU steps; later -S arguments win.
    tiny = {"device": "cpu", "precision": "fp32", "steps": 20, "batch_size": 8, "channels": 8, "warmup_steps": 2, "checkpoint_every": 10, "log_every": 10}
    arguments = [*overlay, "-S", f"data.data_root={tmp_path / 'raw'}", "-S", "evaluate.straightness_n=16", "-S", "evaluate.straightness_steps=4"]
    for key, value in tiny.items():
        arguments += ["-S", f"++train.overrides.mnist.{key}={value}"]
    run([DVC, "exp", "run", "-n", "mnist-tiny", "evaluate@mnist", *arguments], root, timeout=300)

    metrics = json.loads((root / "reports" / "metrics" / "mnist.json").read_text())
    model = torch.load(root / "data" / "models" / "mnist" / "model.pt", weights_only=True)
    experiments = json.loads(run([DVC, "exp", "show", "--json"], root).stdout)
    names = [exp["name"] for entry in experiments for exp in (entry.get("experiments") or [])]
    assert metrics["fd_pca"] > 0
    assert model["config"]["kind"] == "unet"
    assert model["step"] == 20
    assert "mnist-tiny" in names
