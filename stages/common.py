"""What every stage shares: logging, one-line errors, atomic writes, seeding.

Every output is written to a temporary file in the same directory and renamed into
place, so a stage killed at any moment leaves either the previous file or none.
SIGTERM ends a stage through its ``finally`` blocks, which delete the temporary file.
A temporary file left by SIGKILL is deleted when the next stage starts (its name holds
the writer's process id) and is listed in .dvcignore, so DVC never hashes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger("flowmatch")

# Read once at import: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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


class Terminated(BaseException):
    """SIGTERM arrived; a ``BaseException`` so that no ``except Exception`` in a stage swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` and turn a ``StageError`` into one line on stderr and exit code 2.

    SIGTERM raises ``Terminated`` inside ``main``, so that ``atomic_path`` deletes the
    temporary file it was writing, and the stage exits with code 128 + 15. SIGINT
    (Ctrl-C) does the same through ``KeyboardInterrupt`` and exits with 128 + 2.
    """
    setup_logging()
    remove_stale_temporaries()
    start = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main()
    except StageError as error:
        # One line even when the message quotes a multi-line library error.
        print("error: " + re.sub(r"\s*[\r\n]+\s*", " ", str(error)), file=sys.stderr)
        sys.exit(2)
    except Terminated as terminated:
        print(f"error: stopped by {terminated}; outputs written so far are complete, the others are unchanged", file=sys.stderr)
        sys.exit(128 + terminated.signum)
    except KeyboardInterrupt:
        print("error: stopped by SIGINT; outputs written so far are complete, the others are unchanged", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    log.info("finished in %.1f s", time.perf_counter() - start)


# The temporary names of atomic_path: ".STEM.PID.RANDOM.tmpSUFFIX", RANDOM as tempfile.mkstemp makes it.
TEMPORARY_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp(\.[^./]*)?$")
OUTPUT_ROOTS = ("data", "reports")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(roots: tuple[str, ...] = OUTPUT_ROOTS) -> list[Path]:
    """Delete the temporary files and directories under ``roots`` whose writing process no longer runs; return them.

    Such files are left by a stage killed with SIGKILL. Files of a running process (another
    stage in the same checkout) are kept.
    """
    removed = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        # A stale directory is removed with its contents, so the list is made before deleting.
        for path in sorted(root.rglob(".*.tmp*")):
            match = TEMPORARY_NAME.match(path.name)
            if not match or _process_exists(int(match["pid"])) or any(path.is_relative_to(done) for done in removed):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                path.unlink(missing_ok=True)
            else:
                continue
            removed.append(path)
    if removed:
        log.info("removed %d temporary files left by stopped stages: %s", len(removed), ", ".join(map(str, removed)))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the extension of ``path`` (or ``suffix``), because some
    writers (matplotlib, numpy) choose the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file as 0600; give the output the usual permissions instead.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; put it in place of ``path`` when the block succeeds.

    Readers see the previous directory, then for a moment none, then the new one, never a
    partly written one. The previous directory is moved aside before the new one is
    renamed onto ``path`` and deleted afterwards. When the block raises, the temporary
    directory is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield staging
        # mkdtemp creates the directory as 0700; give the output the usual permissions instead.
        os.chmod(staging, 0o777 & ~_UMASK)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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

    # torch.save names the archive's top folder after a file path it is given, which would
    # put the random temporary name into the bytes; an open file gets the fixed name "archive".
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure with fixed metadata, so the same figure gives the same bytes."""
    import matplotlib
    import matplotlib.pyplot as plt

    path = Path(path)
    # The keys that would hold the version, the date or the creating program, per format.
    metadata = {
        ".png": {"Software": None},
        ".svg": {"Creator": None, "Date": None},
        ".pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    }.get(path.suffix.lower())
    # SVG element ids are hashes salted with a random value unless svg.hashsalt is set.
    with matplotlib.rc_context({"svg.hashsalt": "flowmatch"}), atomic_path(path) as tmp:
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
