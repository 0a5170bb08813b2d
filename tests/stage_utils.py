"""Helpers for tests that run one stage in a temporary directory, in process or as a subprocess.

``copy_params`` writes the repository's params.yaml into a directory with section
overrides and a schedule. ``run_in_directory`` runs a stage's ``main`` there with
command-line arguments, and ``cached_stage_runner`` builds on it to run a stage once
per set of arguments for a whole test module. ``run_stage_expecting_error`` runs a
stage as its ``__main__`` does and returns its one error line. ``run_python_module``
runs ``python -m`` on a stage module. ``read_json_strict`` reads a JSON file and fails
the test on NaN or Infinity. The autouse fixture in conftest.py restores PyTorch's
thread count after each test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline_utils import REPO
from stages.common import run_stage


def copy_params(directory: Path, sections: dict[str, dict] | None = None, schedule: str | None = None) -> Path:
    """Write the repository's params.yaml into ``directory`` and return ``directory``.

    Each entry of ``sections`` updates that section's keys. ``schedule`` replaces the
    top-level ``schedule`` unless it is None.
    """
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in (sections or {}).items():
        raw[section].update(values)
    if schedule is not None:
        raw["schedule"] = schedule
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return directory


def run_in_directory(main: Callable[[], None], directory: Path, *arguments: str) -> None:
    """Run a stage's ``main`` in ``directory`` with ``arguments`` as its command-line arguments.

    The working directory, ``sys.argv`` and PyTorch's process-wide thread count, which
    stages set, are restored afterwards, also when ``main`` raises. This makes it fit
    for module-scoped fixtures, because the autouse fixture in conftest.py restores the
    thread count only around each test.
    """
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(directory)
            patch.setattr(sys, "argv", [main.__module__, *arguments])
            main()
    finally:
        torch.set_num_threads(threads)


def cached_stage_runner(tmp_path_factory: pytest.TempPathFactory, main: Callable[[], None], setup: Callable[..., object]) -> Callable[..., Path]:
    """Return ``run(*args, **kwargs)``, which runs ``main`` once per distinct arguments and returns the directory it ran in.

    The first call with given arguments makes a new directory, calls
    ``setup(directory, *args, **kwargs)`` to write the stage's inputs and runs ``main``
    there. Later calls whose arguments have the same ``repr`` return that directory
    without running the stage again. A run that raises is not cached.
    """
    directories: dict[str, Path] = {}
    stage_name = main.__module__.rpartition(".")[2]

    def run(*args, **kwargs) -> Path:
        key = repr((args, sorted(kwargs.items())))
        if key not in directories:
            directory = tmp_path_factory.mktemp(stage_name)
            setup(directory, *args, **kwargs)
            run_in_directory(main, directory)
            directories[key] = directory
        return directories[key]

    return run


def run_stage_expecting_error(main: Callable[[], None], directory: Path, capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    """Run ``main`` in ``directory`` as its ``__main__`` does and return its one ``error: `` line.

    The test fails unless the stage exits with code 2, prints exactly one line starting
    with ``error: `` and prints no traceback. Output captured before the call is
    discarded, so only this run's stderr is checked.
    """
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        patch.setattr(sys, "argv", [main.__module__, *arguments])
        with pytest.raises(SystemExit) as caught:
            run_stage(main)

    stderr = capsys.readouterr().err
    assert caught.value.code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def run_python_module(module: str, directory: Path, *arguments: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python -m module arguments`` in ``directory`` with the repository on PYTHONPATH.

    Returns the finished process with stdout and stderr as text. ``timeout`` is in
    seconds, and ``subprocess.TimeoutExpired`` is raised when it runs out.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", module, *arguments]
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout)


def read_json_strict(path: Path) -> Any:
    """Parse the JSON file at ``path``, failing the test if it contains NaN, Infinity or -Infinity."""
    text = path.read_text()
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"{path} contains {token}"))
