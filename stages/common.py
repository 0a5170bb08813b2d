"""What every stage shares: logging, one-line errors, atomic writes, seeding.

Every output is written to a temporary file in the same directory and renamed into
place, so a stage killed at any moment leaves either the previous file or none.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger("flowmatch")


class StageError(Exception):
    """An error a user can fix (bad parameter, missing or corrupt input); printed as one line."""


class ParamError(StageError):
    """An invalid value in params.yaml, named by its key path."""

    def __init__(self, key: str, value: object, accepted: str):
        self.key = key
        self.value = value
        self.accepted = accepted
        super().__init__(f"params.yaml: invalid value for '{key}': {value!r} (accepted: {accepted})")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` and turn a ``StageError`` into one line on stderr and exit code 2."""
    setup_logging()
    start = time.perf_counter()
    try:
        main()
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    log.info("finished in %.1f s", time.perf_counter() - start)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the extension of ``path`` (or ``suffix``), because some
    writers (matplotlib, numpy) choose the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write strict JSON: a NaN or infinity raises ``ValueError`` instead of writing ``NaN``."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV with a header and no index column."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.8g", lineterminator="\n")
    write_text(path, buffer.getvalue())


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def save_torch(path: str | os.PathLike, obj: object) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure with fixed metadata, so the same figure gives the same bytes."""
    import matplotlib.pyplot as plt

    path = Path(path)
    metadata = {"Software": None} if path.suffix == ".png" else {"Creator": None, "Date": None}
    if path.suffix == ".svg":
        metadata = {"Date": None, "Creator": None}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, metadata=metadata)
    plt.close(fig)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch, and ask PyTorch for deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file, raising ``StageError`` naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found; run the stage that writes it first (dvc repro)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # numpy raises several types for truncated or altered archives
        raise StageError(f"{path}: cannot read the file ({type(error).__name__}: {error}); delete it and rerun dvc repro") from error
