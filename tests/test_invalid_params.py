"""Every stage rejects an invalid params.yaml before it does any work.

Hypothesis corrupts the default params.yaml: wrong types, negative or zero counts, NaN
and infinity, times out of range, unknown names, empty lists, unknown and missing keys,
sections that are not mappings, malformed YAML. Each stage's ``main`` then runs
in-process through ``run_stage`` in a directory that contains only that file. Each run
must exit with code 2 and write exactly one line to stderr, the validator's message
naming the key path and the value. It must show no traceback and leave no file behind.
One subprocess per stage checks that the real command line behaves the same way, and
each stage's ``main`` must call ``load_params`` as its first statement.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib
import io
import logging
import math
import os
import string
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from pipeline_utils import REPO, environment, matrix_values
from stages.common import ParamError, StageError, run_stage
from stages.config import load_params



def stage_arguments() -> dict[str, list[str]]:
    """Return each stage module of dvc.yaml with valid command-line arguments, so only params.yaml is wrong.

    A matrix stage gets its ``moons`` (or else its first) value.
    """
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    commands = {}
    for stage in stages.values():
        words = stage["cmd"].split()
        assert words[:2] == ["python", "-m"], f"unexpected stage command {stage['cmd']!r}"
        assert words[2].startswith("stages."), f"unexpected stage command {stage['cmd']!r}"
        arguments = []
        for word in words[3:]:
            for key, entry in (stage.get("matrix") or {}).items():
                values = matrix_values(REPO, entry)
                word = word.replace(f"${{item.{key}}}", "moons" if "moons" in values else str(values[0]))
            arguments.append(word)
        commands[words[2].removeprefix("stages.")] = arguments
    return commands


STAGE_ARGUMENTS = stage_arguments()

DEFAULT_TEXT = (REPO / "params.yaml").read_text(encoding="utf-8")
DEFAULT = yaml.safe_load(DEFAULT_TEXT)

NAMES = st.sampled_from(["", " ", "Cosine", "LINEAR", "cosine ", "gpu", "cuda:0", "tpu", "rk45", "euler2", "mnist", "moon", "none", "fp16", "True"]) | st.text(max_size=8)
JUNK = st.sampled_from([None, [], {}, [[]], {"a": 1}, "", "1", "1e3", "NaN", "yes"])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NON_MAPPINGS = st.sampled_from([None, [], [1, 2], "x", 3, 0.5, True])
KEY_NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)


def bad_values(original: object) -> st.SearchStrategy:
    """Values of the wrong type or out of range for a key whose default value is ``original``."""
    if isinstance(original, bool):
        return st.sampled_from([0, 1, "true", "false", "yes", "on", None, 1.0, [True]])
    if isinstance(original, int):
        return st.integers(max_value=-1) | st.just(0) | st.integers(min_value=2**32, max_value=2**70) | st.floats() | st.booleans() | NAMES | JUNK
    if isinstance(original, float):
        return NON_FINITE | st.floats(max_value=0.0) | st.floats(min_value=1.0, allow_infinity=False) | st.booleans() | NAMES | JUNK
    if isinstance(original, str):
        return NAMES | st.integers() | st.floats() | st.booleans() | JUNK
    if isinstance(original, list):
        first = original[0] if original else 0
        repeated = list(original) + list(original[:1])
        return st.just([]) | st.just(repeated) | st.lists(bad_values(first), min_size=1, max_size=3).map(lambda bad: list(original) + bad) | NAMES | st.integers() | JUNK
    if isinstance(original, dict):
        # train.overrides: per-data-set mappings with unknown data sets, forbidden keys or bad values.
        return st.sampled_from([[], "moons", {"mnist": {}}, {"moons": "x"}, {"moons": {"nproc": 2}}, {"moons": {"lr": -1.0}}, {"digits": {"model": "resnet"}}, {"moons": {"speed": 1}}])
    return NAMES | st.integers() | st.booleans() | st.just([])  # a null default (sample.schedule)


def value_paths(node: object, path: tuple = ()) -> list[tuple[tuple, object]]:
    """Return ``(path, value)`` for every value below ``node`` that is not a non-empty mapping, list items included."""
    found = []
    if isinstance(node, dict) and node:
        for key, value in node.items():
            found += value_paths(value, path + (key,))
        return found
    found.append((path, node))
    if isinstance(node, list):
        found += [(path + (i,), item) for i, item in enumerate(node)]
    return found


def mapping_paths(node: object, path: tuple = ()) -> list[tuple]:
    found = []
    if isinstance(node, dict):
        found.append(path)
        for key, value in node.items():
            found += mapping_paths(value, path + (key,))
    return found


VALUE_PATHS = value_paths(DEFAULT)
MAPPING_PATHS = mapping_paths(DEFAULT)
KEY_PATHS = [path for path, _ in VALUE_PATHS if not isinstance(path[-1], int)] + [p for p in MAPPING_PATHS if p]


@dataclass(frozen=True)
class Edit:
    """One change to the parsed params: set (or add) ``path`` to ``value``, or delete it."""

    path: tuple
    value: object = None
    delete: bool = False

    def apply(self, raw: dict) -> bool:
        """Apply the edit to ``raw`` in place; return False when an earlier edit removed its parent."""
        parent = raw
        for name in self.path[:-1]:
            if isinstance(parent, dict) and name in parent or isinstance(parent, list) and isinstance(name, int) and name < len(parent):
                parent = parent[name]
            else:
                return False
        last = self.path[-1]
        if isinstance(parent, list) and isinstance(last, int) and last < len(parent):
            parent[last] = self.value
        elif isinstance(parent, dict) and self.delete:
            parent.pop(last, None)
        elif isinstance(parent, dict):
            parent[last] = self.value
        else:
            return False
        return True


@st.composite
def value_edits(draw) -> Edit:
    path, original = draw(st.sampled_from(VALUE_PATHS))
    return Edit(path, draw(bad_values(original)))


@st.composite
def unknown_key_edits(draw) -> Edit:
    section = draw(st.sampled_from(MAPPING_PATHS))
    parent = DEFAULT
    for name in section:
        parent = parent[name]
    name = draw(KEY_NAMES.filter(lambda key: key not in parent))
    return Edit(section + (name,), draw(st.integers() | NAMES | JUNK))


@st.composite
def missing_key_edits(draw) -> Edit:
    return Edit(draw(st.sampled_from(KEY_PATHS)), delete=True)


@st.composite
def non_mapping_edits(draw) -> Edit:
    return Edit(draw(st.sampled_from([p for p in MAPPING_PATHS if p])), draw(NON_MAPPINGS))


EDITS = value_edits() | unknown_key_edits() | missing_key_edits() | non_mapping_edits()


@st.composite
def edited_params(draw) -> tuple[bytes, set[str]]:
    """Return a params.yaml with one to three edits and the top-level keys they touched."""
    raw = copy.deepcopy(DEFAULT)
    touched = set()
    for edit in draw(st.lists(EDITS, min_size=1, max_size=3)):
        if edit.apply(raw):
            touched.add(str(edit.path[0]))
    text = yaml.dump(raw, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True)
    return text.encode("utf-8"), touched


MALFORMED_SNIPPETS = [
    "\tseed: 0\n",
    "broken: [1, 2\n",
    "broken: {a: 1\n",
    'broken: "unterminated\n',
    "- a list item after a mapping\n",
    "seed: 0: 1\n",
    "tuple: !!python/tuple [1, 2]\n",
    "alias: *undefined\n",
    "---\nseed: 0\n",
    "  indented: wrongly\n",
    "seed: \x00\n",
]


@st.composite
def malformed_params(draw) -> tuple[bytes, None]:
    """Return a params.yaml that is not valid YAML, not UTF-8, truncated, or not a mapping at the top.

    The second item is None: the edits touch no particular section.
    """
    lines = DEFAULT_TEXT.splitlines(keepends=True)
    kind = draw(st.sampled_from(["snippet", "bytes", "truncate", "top_level"]))
    if kind == "snippet":
        at = draw(st.integers(0, len(lines)))
        text = "".join(lines[:at]) + draw(st.sampled_from(MALFORMED_SNIPPETS)) + "".join(lines[at:])
        return text.encode("utf-8"), None
    if kind == "bytes":
        data = DEFAULT_TEXT.encode("utf-8")
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80abc"])) + data[at:], None
    if kind == "truncate":
        data = DEFAULT_TEXT.encode("utf-8")
        return data[: draw(st.integers(0, len(data) - 2))], None
    return draw(st.sampled_from([b"", b"null\n", b"42\n", b"- seed\n- 0\n", b"just text\n", b"[1, 2]\n"])), None


PARAMS_FILES = edited_params() | malformed_params()


def expected_error(data: bytes) -> StageError | None:
    """Return the error that ``load_params`` raises on ``data``, or None when the file is valid."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "params.yaml").write_bytes(data)
        os.chdir(folder)
        try:
            load_params()
        except StageError as error:
            return error
        finally:
            os.chdir(previous)
    return None


@functools.cache
def default_error() -> StageError | None:
    return expected_error(DEFAULT_TEXT.encode("utf-8"))


class _CurrentStderr(logging.Handler):
    """A logging handler that writes to the ``sys.stderr`` of the moment, where a stage's own handler writes."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@contextlib.contextmanager
def stage_logging():
    root = logging.getLogger()
    handler = _CurrentStderr()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@dataclass
class StageRun:
    code: object
    stderr: str
    stdout: str
    files: list[str]
    warnings: list[str]


def run_in_process(module, arguments: list[str], data: bytes) -> StageRun:
    """Run ``module.main`` through ``run_stage`` in a fresh directory holding ``data`` as params.yaml."""
    stderr, stdout = io.StringIO(), io.StringIO()
    code = None
    previous = os.getcwd()
    argv = sys.argv
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "params.yaml").write_bytes(data)
        os.chdir(folder)
        sys.argv = [f"stages/{module.__name__.rsplit('.', 1)[-1]}.py", *arguments]
        try:
            with warnings.catch_warnings(record=True) as caught, stage_logging(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                warnings.simplefilter("always")
                try:
                    run_stage(module.main)
                except SystemExit as exit:
                    code = exit.code
        finally:
            os.chdir(previous)
            sys.argv = argv
        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.name != "params.yaml")
    return StageRun(code, stderr.getvalue(), stdout.getvalue(), files, [str(w.message) for w in caught])


def stage_module(name: str):
    try:
        return importlib.import_module(f"stages.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"stages.{name}":
            pytest.skip(f"stages/{name}.py does not exist yet")
        raise


def check_rejected(run: StageRun, error: StageError) -> None:
    assert run.code == 2, f"exit code {run.code!r}; stderr:\n{run.stderr}"
    assert "Traceback" not in run.stderr
    assert run.stderr.endswith("\n")
    assert run.stderr.count("\n") == 1, f"more than one line on stderr:\n{run.stderr}"
    assert run.stderr == f"error: {error}\n"
    assert run.stdout == ""
    assert run.files == []
    assert run.warnings == []


@pytest.mark.parametrize("stage", list(STAGE_ARGUMENTS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(params=PARAMS_FILES)
def test_stage_rejects_invalid_params(stage, params):
    assert default_error() is None, f"the default params.yaml is invalid, so no edit can be told apart: {default_error()}"
    data, touched = params
    error = expected_error(data)
    if error is None:
        reject()
    module = stage_module(stage)

    run = run_in_process(module, STAGE_ARGUMENTS[stage], data)

    check_rejected(run, error)
    if isinstance(error, ParamError):
        assert f"'{error.key}'" in run.stderr
        assert repr(error.value) in run.stderr
    if isinstance(error, ParamError) and touched is not None:
        section = error.key.split(".")[0].split("[")[0]
        assert section in touched, f"{error.key} is outside the edited sections {sorted(touched)}"
    if not isinstance(error, ParamError):
        assert run.stderr.startswith("error: params.yaml: ")


@pytest.mark.parametrize("stage", list(STAGE_ARGUMENTS))
def test_main_validates_params_first(stage):
    path = REPO / "stages" / f"{stage}.py"
    if not path.exists():
        pytest.skip(f"stages/{stage}.py does not exist yet")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    first = main.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        first = main.body[1]  # the docstring

    assert isinstance(first, ast.Assign), ast.unparse(first)
    assert isinstance(first.value, ast.Call)
    assert ast.unparse(first.value.func) == "load_params"


@pytest.mark.parametrize("stage", list(STAGE_ARGUMENTS))
def test_stage_rejects_missing_params_file(stage):
    module = stage_module(stage)
    stderr = io.StringIO()
    previous = os.getcwd()
    argv = sys.argv
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        sys.argv = [stage, *STAGE_ARGUMENTS[stage]]
        try:
            with stage_logging(), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit:
                run_stage(module.main)
        finally:
            os.chdir(previous)
            sys.argv = argv
        left = list(Path(folder).iterdir())

    assert exit.value.code == 2
    assert stderr.getvalue() == "error: params.yaml: cannot read the parameter file (No such file or directory)\n"
    assert left == []


# ---------------------------------------------------------------- the real command line

# Each stage checks the whole file, so a key that only some stages use must stop every stage.
CLI_PARAMS = DEFAULT_TEXT.replace("  n_train: 20000\n", "  n_train: -5\n")
CLI_MESSAGE = "error: params.yaml: invalid value for 'data.n_train': -5 (accepted: an integer >= 2)\n"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[int, str, str, list[str]]]:
    """Start every stage's command line at once on the same invalid params.yaml; return its exit code, output and files left."""
    assert CLI_PARAMS != DEFAULT_TEXT, "params.yaml no longer has 'n_train: 20000' under data; update CLI_PARAMS"
    started = {}
    for stage, arguments in STAGE_ARGUMENTS.items():
        if not (REPO / "stages" / f"{stage}.py").exists():
            continue
        folder = tmp_path_factory.mktemp(stage)
        (folder / "params.yaml").write_text(CLI_PARAMS, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}", *arguments],
            cwd=folder, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        started[stage] = (process, folder)
    results = {}
    for stage, (process, folder) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "params.yaml")
        results[stage] = (process.returncode, stdout, stderr, files)
    return results


@pytest.mark.parametrize("stage", list(STAGE_ARGUMENTS))
def test_command_line_rejects_invalid_params(cli_runs, stage):
    if stage not in cli_runs:
        pytest.skip(f"stages/{stage}.py does not exist yet")
    code, stdout, stderr, files = cli_runs[stage]

    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert stderr == CLI_MESSAGE
    assert stdout == ""
    assert files == []
