"""Image data sets read by torchvision: MNIST, Fashion-MNIST and CIFAR-10.

Each set keeps its official train and test split. Pixels are mapped from ``0..255``
onto ``[-1, 1]`` and images are returned as ``(n, channels, height, width)`` float32,
the layout of the digits set. The files live under a root folder in the layout that
torchvision's data set classes expect (``IMAGE_SOURCES`` lists it per set). Without
``download`` no network access happens: missing files raise
``ImageFilesNotFoundError`` with one line that names the files and the folder.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")

# Pixels are 8-bit: 0..255 maps linearly onto [-1, 1].
PIXEL_MAX = 255.0


@dataclass(frozen=True)
class ImageSource:
    """The files of one data set as torchvision expects them under the root folder.

    ``class_name`` is the torchvision class (``torchvision.datasets.MNIST`` and so on).
    ``files`` must all be in ``folder``. With ``gzip_accepted`` a file may also be
    present as ``NAME.gz``, the form in which MNIST and Fashion-MNIST are distributed.
    """

    class_name: str
    folder: str
    files: tuple[str, ...]
    shape: tuple[int, int, int]
    n_classes: int
    gzip_accepted: bool


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

IMAGE_SOURCES = {
    "mnist": ImageSource("MNIST", "MNIST/raw", _IDX_FILES, (1, 28, 28), 10, True),
    "fashion_mnist": ImageSource("FashionMNIST", "FashionMNIST/raw", _IDX_FILES, (1, 28, 28), 10, True),
    "cifar10": ImageSource(
        "CIFAR10",
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        (3, 32, 32),
        10,
        False,
    ),
}


class ImageFilesNotFoundError(FileNotFoundError):
    """Files of an image data set are missing from the root folder and no download was requested."""


class ImageFilesInvalidError(ValueError):
    """Files of an image data set are present but torchvision cannot use them (wrong checksum or format)."""


@dataclass(frozen=True)
class ImageSplit:
    """Images scaled to ``[-1, 1]``, shape ``(n, channels, height, width)`` float32, labels int64."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """Map 8-bit pixel values ``0..255`` linearly onto ``[-1, 1]``, as float32."""
    half = PIXEL_MAX / 2.0
    return ((np.asarray(pixels, dtype=np.float32) - half) / half).astype(np.float32)


def image_source(name: str) -> ImageSource:
    if name not in IMAGE_SOURCES:
        raise ValueError(f"unknown image data set {name!r}; accepted: {', '.join(IMAGE_DATASETS)}")
    return IMAGE_SOURCES[name]


def missing_files(name: str, root: str | os.PathLike) -> list[str]:
    """Return the files of ``name`` that are neither in its folder under ``root`` nor, where accepted, gzipped there."""
    source = image_source(name)
    folder = Path(root) / source.folder
    missing = []
    for file in source.files:
        present = (folder / file).is_file() or (source.gzip_accepted and (folder / f"{file}.gz").is_file())
        if not present:
            missing.append(file)
    return missing


def _unpack_gzipped(source: ImageSource, folder: Path) -> None:
    """Write ``NAME`` next to each ``NAME.gz`` whose unpacked form is missing, because torchvision reads only unpacked files."""
    for file in source.files:
        target, packed = folder / file, folder / f"{file}.gz"
        if target.is_file() or not packed.is_file():
            continue
        partial = folder / f".{file}.{os.getpid()}.partial"
        try:
            with gzip.open(packed, "rb") as reader, open(partial, "wb") as writer:
                shutil.copyfileobj(reader, writer)
            os.replace(partial, target)
        except (OSError, EOFError) as error:
            raise ImageFilesInvalidError(f"{source.class_name}: cannot unpack {packed} ({error}); replace the file") from error
        finally:
            partial.unlink(missing_ok=True)


def _describe_missing(source: ImageSource, folder: Path, missing: list[str]) -> str:
    suffix = "(.gz)" if source.gzip_accepted else ""
    listed = ", ".join(f"{file}{suffix}" for file in missing)
    return f"{source.class_name}: files not found under {folder}: {listed}"


def _checksum_failures(source: ImageSource, folder: Path, dataset_class) -> list[str]:
    """Return the files that fail the MD5 sums in torchvision's class table. Only CIFAR-10 has such a table."""
    from torchvision.datasets.utils import check_integrity

    table = getattr(dataset_class, "train_list", []) + getattr(dataset_class, "test_list", [])
    meta = getattr(dataset_class, "meta", None)
    if meta:
        table = table + [[meta["filename"], meta["md5"]]]
    return [file for file, md5 in table if not check_integrity(str(folder / file), md5)]


def _read_split(dataset_class, root: Path, train: bool, download: bool, source: ImageSource) -> tuple[np.ndarray, np.ndarray]:
    dataset = dataset_class(root=str(root), train=train, download=download)
    data = np.asarray(dataset.data)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    channels, height, width = source.shape
    if data.ndim == 3:
        data = data[:, None, :, :]
    else:
        # CIFAR-10 is stored as (n, height, width, channels).
        data = data.transpose(0, 3, 1, 2)
    if data.shape[1:] != (channels, height, width):
        raise ImageFilesInvalidError(f"{source.class_name}: images under {root / source.folder} have shape {data.shape[1:]}, expected {source.shape}")
    return scale_pixels(data), labels


def load_image_split(name: str, root: str | os.PathLike, download: bool = False) -> ImageSplit:
    """Read the official train and test split of image data set ``name`` with torchvision.

    ``root`` is the folder given to torchvision (``IMAGE_SOURCES[name].folder`` lies
    under it). Gzipped MNIST files are unpacked next to themselves first. Without
    ``download`` a missing file raises ``ImageFilesNotFoundError``. With it, torchvision
    fetches what is missing, and a failed download raises ``OSError``. Files that fail
    torchvision's checksums or that it cannot parse raise ``ImageFilesInvalidError``.
    """
    import torchvision.datasets

    source = image_source(name)
    root = Path(root).expanduser().resolve()
    folder = root / source.folder
    dataset_class = getattr(torchvision.datasets, source.class_name)

    if folder.is_dir():
        _unpack_gzipped(source, folder)
    missing = missing_files(name, root)
    if missing and not download:
        raise ImageFilesNotFoundError(_describe_missing(source, folder, missing))

    if not missing:
        failures = _checksum_failures(source, folder, dataset_class)
        if failures and not download:
            raise ImageFilesInvalidError(
                f"{source.class_name}: files under {folder} fail torchvision's MD5 check (a partial or altered copy): {', '.join(failures)}"
            )

    try:
        train, train_labels = _read_split(dataset_class, root, True, download, source)
        test, test_labels = _read_split(dataset_class, root, False, download, source)
    except (OSError, ImageFilesInvalidError):
        # A failed download (urllib's URLError is an OSError) keeps its type and message.
        raise
    except Exception as error:  # torchvision's readers raise RuntimeError, AssertionError or pickle errors on bad files
        # torchvision's format checks are bare asserts, whose message is empty.
        detail = " ".join(str(error).split()) or "no message; the file contents are not in the format torchvision expects"
        action = "download or read" if download else "read"
        raise ImageFilesInvalidError(f"{source.class_name}: torchvision could not {action} the files under {folder} ({type(error).__name__}: {detail[:300]})") from error
    return ImageSplit(train=train, train_labels=train_labels, test=test, test_labels=test_labels)
