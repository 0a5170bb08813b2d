"""Compare DVC experiments: the parameters that differ, headline metrics and quality against NFE.

Reads the output of ``dvc exp show --json`` (DVC 3.x: a list of commits, each with its
own ``data`` and a list of ``experiments`` whose ``revs`` carry ``data`` with ``params``
and ``metrics``) and writes reports/comparison.md plus
reports/figures/comparison_quality_vs_nfe.png, one line per experiment.

Only rows with results of their own fill the tables and the figure. DVC shows failed,
queued and running experiments with the metrics of the commit they started from, so they
are listed by name with the parameters they change instead. So is a workspace whose
outputs are not up to date (``dvc status``) and a revision that DVC could not read.

The per-NFE values come from the metrics themselves when they contain solver and NFE
keys (``by_solver.rk4.nfe16.w2``). Otherwise they are read from the plot CSVs
(columns ``solver``, ``nfe`` and the metric) of each experiment's git revision with
``git show REV:PATH``, since DVC stores experiments as git commits.

Usage (from the repository root): ``python tools/compare.py [--input exp_show.json]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

log = logging.getLogger("flowmatch.compare")

SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5")
# Top-level metrics shown per metrics file, in column order, when an experiment has them.
HEADLINE_METRICS = (
    "w2", "w2_floor", "energy", "mmd", "nll", "straightness", "velocity_error",
    "fid", "fid_floor", "fd_pca", "fd_pca_floor", "frechet", "entropy", "memorisation", "accuracy",
)
# Quality metrics for the NFE figure, in order of preference.
QUALITY_METRICS = ("w2", "frechet", "fid", "fd_pca", "energy", "mmd")
NFE_KEY = re.compile(r"^(?:(?P<solver>[a-z0-9]+)[_-])?nfe[_-]?(?P<nfe>\d+)$")

# Row states. "failed", "queued" and "running" are DVC's executor states of a queued
# experiment. "unreadable" is a revision that DVC could not collect, and "outdated" a
# workspace whose outputs are not up to date. Only "success" rows are compared.
SUCCESS = "success"
PENDING_STATES = ("queued", "running")
LAYOUT_ERROR = "not the layout of `dvc exp show --json`"
# How many stage names the note on an outdated workspace shows.
MAX_STAGES_SHOWN = 4


class CompareError(Exception):
    """Invalid input: unreadable ``dvc exp show`` output or a failing command."""


@dataclass
class Experiment:
    """One row of ``dvc exp show``: the workspace, a baseline commit or an experiment."""

    name: str
    rev: str
    params: dict[str, object]
    metrics: dict[str, dict]
    kind: str
    error: str | None = None
    state: str = SUCCESS
    # "name=value" for each parameter that differs from the baseline commit (from HEAD for the workspace).
    changed_params: list[str] = field(default_factory=list)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ---------------------------------------------------------------- reading dvc exp show


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _require(value: object, expected: type | tuple[type, ...], where: str, description: str):
    """Return ``value``, or raise CompareError naming its place ``where`` when it is not of the ``expected`` type."""
    if not isinstance(value, expected):
        raise CompareError(f"{LAYOUT_ERROR}: {where} is {json.dumps(value)[:60]}, expected {description}")
    return value


def _read_params(data: dict, where: str) -> dict[str, object]:
    """Flatten ``data.params`` to ``{"train.lr": 0.002}``, with ``FILE:`` before keys from files other than params.yaml."""
    params: dict[str, object] = {}
    files = _require(data.get("params"), (dict, type(None)), f"{where}.params", "an object or null") or {}
    for file, content in files.items():
        place = f"{where}.params[{json.dumps(file)}]"
        content = _require(content, (dict, type(None)), place, "an object or null") or {}
        values = _require(content.get("data"), (dict, type(None)), f"{place}.data", "an object or null") or {}
        prefix = "" if file == "params.yaml" else f"{file}:"
        params.update({prefix + key: value for key, value in flatten(values).items()})
    return params


def _read_metrics(data: dict, where: str) -> dict[str, dict]:
    """Return ``{path: metrics}`` from ``data.metrics``, skipping files that DVC reports with an error instead of data."""
    files = _require(data.get("metrics"), (dict, type(None)), f"{where}.metrics", "an object or null") or {}
    metrics = {}
    for path, content in files.items():
        content = _require(content, (dict, type(None)), f"{where}.metrics[{json.dumps(path)}]", "an object or null") or {}
        if isinstance(content.get("data"), dict):
            metrics[path] = content["data"]
    return metrics


def _row_state(entry: dict, executor: dict | None) -> str:
    executor_state = (executor or {}).get("state")
    if executor_state in ("failed", *PENDING_STATES):
        return executor_state
    if entry.get("error") is None:
        return SUCCESS
    # DVC 3.67 replaces the data of a revision it cannot collect with the error. The only
    # error it puts beside data is {"msg": "Experiment run failed"}, on a failed queued run.
    return "failed" if entry.get("data") else "unreadable"


def _row(entry: object, kind: str, where: str, fallback_name: str | None = None, executor: dict | None = None) -> Experiment:
    entry = _require(entry, dict, where, "an object")
    rev = _require(entry.get("rev"), str, f"{where}.rev", "a string")
    name = _require(entry.get("name"), (str, type(None)), f"{where}.name", "a string or null")
    data = _require(entry.get("data"), (dict, type(None)), f"{where}.data", "an object or null") or {}
    error = _require(entry.get("error"), (dict, str, type(None)), f"{where}.error", "an object, a string or null")
    message = None
    if isinstance(error, dict):
        message = str(error.get("msg") or error.get("type") or error)
    elif error:
        message = error
    return Experiment(
        name=name or fallback_name or rev[:7],
        rev=rev,
        params=_read_params(data, f"{where}.data"),
        metrics=_read_metrics(data, f"{where}.data"),
        kind=kind,
        error=message,
        state=_row_state(entry, executor),
    )


def _experiment_row(experiment: object, baseline: Experiment, where: str) -> Experiment | None:
    """Return the row of one entry of a commit's ``experiments``: its newest revision, or None without one."""
    experiment = _require(experiment, dict, where, "an object")
    revs = _require(experiment.get("revs"), (list, type(None)), f"{where}.revs", "a list or null") or []
    executor = _require(experiment.get("executor"), (dict, type(None)), f"{where}.executor", "an object or null")
    name = _require(experiment.get("name"), (str, type(None)), f"{where}.name", "a string or null")
    if not revs:
        return None
    row = _row(revs[0], "experiment", f"{where}.revs[0]", name, executor)
    row.changed_params = changed_params(baseline, row)
    return row


def changed_params(baseline: Experiment, row: Experiment) -> list[str]:
    """Return ``name=value`` for each parameter of ``row`` that differs from ``baseline``, and ``name removed`` for each one it lacks."""
    changes = [
        f"{name}={format_value(value)}"
        for name, value in row.params.items()
        if name not in baseline.params or _canonical(baseline.params[name]) != _canonical(value)
    ]
    return changes + [f"{name} removed" for name in baseline.params if name not in row.params]


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _mark_outdated(workspace: Experiment, rows: list[Experiment], outdated_stages: list[str] | None) -> None:
    """Set the workspace's state to "outdated" when its outputs are not up to date, with the reason in ``error``.

    ``outdated_stages`` comes from ``dvc status``. When it is None (a saved ``dvc exp show``
    output), the workspace is outdated when some other row has the same data in every
    workspace metrics file. A rerun changes at least the run times that the train,
    sample, evaluate and classifier stages write to reports/timing. NOTE: that check also
    hides a workspace whose new parameters reran only stages without metrics.
    """
    if outdated_stages:
        stage_list = ", ".join(outdated_stages[:MAX_STAGES_SHOWN])
        if len(outdated_stages) > MAX_STAGES_SHOWN:
            stage_list += f" and {len(outdated_stages) - MAX_STAGES_SHOWN} more"
        workspace.state = "outdated"
        workspace.error = f"`dvc status` reports stages whose outputs are not up to date ({stage_list})"
        return
    if outdated_stages is not None or not workspace.metrics:
        return
    for row in rows:
        if all(row.metrics.get(path) == data for path, data in workspace.metrics.items()):
            workspace.state = "outdated"
            workspace.error = f"its metrics files are those of {label(row)}, so they were not recomputed for its parameters"
            return


def parse_exp_show(exp_show: object, outdated_stages: list[str] | None = None) -> list[Experiment]:
    """Turn ``dvc exp show --json`` output into rows: each baseline commit followed by its experiments.

    The workspace is kept only when it differs from every other row, because after
    ``dvc exp run`` it contains a copy of the last experiment. A kept workspace may be
    marked "outdated", from ``outdated_stages`` (the stages ``dvc status`` lists) or, when
    that is None, from its metrics (see ``_mark_outdated``). Raises CompareError, naming
    the first value that is out of place, on output of any other layout.
    """
    if not isinstance(exp_show, list):
        raise CompareError(f"{LAYOUT_ERROR}: expected a list of commits, found {type(exp_show).__name__}")
    rows: list[Experiment] = []
    workspace: Experiment | None = None
    for index, commit in enumerate(exp_show):
        where = f"[{index}]"
        if isinstance(commit, dict) and commit.get("rev") == "workspace":
            workspace = _row(commit, "workspace", where, "workspace")
            continue
        baseline = _row(commit, "baseline", where)
        rows.append(baseline)
        experiments = _require(commit.get("experiments"), (list, type(None)), f"{where}.experiments", "a list or null") or []
        for number, experiment in enumerate(experiments):
            row = _experiment_row(experiment, baseline, f"{where}.experiments[{number}]")
            if row is not None:
                rows.append(row)

    if workspace is not None and all((workspace.params, workspace.metrics) != (row.params, row.metrics) for row in rows):
        # The first commit that dvc exp show lists is HEAD.
        head = next((row for row in rows if row.kind == "baseline"), None)
        if head is not None:
            workspace.changed_params = changed_params(head, workspace)
        _mark_outdated(workspace, rows, outdated_stages)
        rows.insert(0, workspace)
    return rows


def run_dvc(root: Path, *arguments: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run DVC in ``root`` without usage analytics; return the command line and the finished process.

    DVC comes from this Python's environment, or from PATH when the environment has none.
    """
    dvc = Path(sys.executable).with_name("dvc")
    command = [str(dvc) if dvc.exists() else "dvc", *arguments]
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    return command, subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def run_exp_show(root: Path) -> object:
    command, result = run_dvc(root, "exp", "show", "--json")
    if result.returncode != 0:
        raise CompareError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise CompareError(f"{' '.join(command)}: output is not JSON ({error})") from error


def run_dvc_status(root: Path) -> list[str] | None:
    """Return the stages that ``dvc status`` reports as changed, in its order, or None when the command fails.

    Stages whose only change is "always changed" are left out, because they are never up to date.
    """
    command, result = run_dvc(root, "status", "--json")
    status = None
    if result.returncode == 0:
        try:
            status = json.loads(result.stdout)
        except json.JSONDecodeError:
            status = None
    if not isinstance(status, dict):
        output = (result.stderr.strip() or result.stdout.strip())[-500:]
        log.warning("%s failed, so the workspace is checked by comparing its metrics files with the other rows: %s", " ".join(command), output)
        return None
    return [stage for stage, changes in status.items() if changes != ["always changed"]]


def read_exp_show_file(path: Path) -> object:
    """Read a saved ``dvc exp show --json`` output. Raises CompareError, naming the file and the problem."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CompareError(f"{path}: cannot read the file ({error.strerror or error})") from error
    if not raw.strip():
        raise CompareError(f"{path}: the file is empty, expected the output of `dvc exp show --json`")
    try:
        # utf-8-sig also accepts the byte order mark that some editors and shells write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CompareError(f"{path}: not UTF-8 text (invalid byte 0x{raw[error.start]:02x} at offset {error.start})") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CompareError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from error


# ---------------------------------------------------------------- tables


def differing_params(rows: list[Experiment]) -> list[str]:
    """Return the parameter names whose values are not the same in every row, in first-seen order."""
    names: list[str] = []
    for row in rows:
        names += [name for name in row.params if name not in names]
    return [name for name in names if len({json.dumps(row.params.get(name), sort_keys=True) for row in rows}) > 1]


def format_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """Return the lines of a markdown table. With ``numeric``, all columns but the first are right-aligned."""
    rule = ["---"] + (["---:"] if numeric else ["---"]) * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def label(row: Experiment) -> str:
    if row.kind == "workspace":
        return "workspace"
    return f"{row.name} ({row.kind}, {row.rev[:7]})"


def headline_columns(rows: list[Experiment], path: str) -> list[str]:
    present = {key for row in rows for key, value in (row.metrics.get(path) or {}).items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return [key for key in HEADLINE_METRICS if key in present]


def metrics_paths(rows: list[Experiment]) -> list[str]:
    return sorted({path for row in rows for path in row.metrics})


# ---------------------------------------------------------------- quality against NFE


def curves_from_metrics(metrics: dict) -> dict[tuple[str, str], dict[int, float]]:
    """Collect ``{(solver, metric): {nfe: value}}`` from keys such as ``by_solver.rk4.nfe16.w2`` or ``rk4_nfe16.w2``."""
    curves: dict[tuple[str, str], dict[int, float]] = {}

    def walk(value: object, solver: str | None, nfe: int | None) -> None:
        if isinstance(value, list):
            for record in value:
                # Records whose NFE is not a JSON integer are skipped.
                if isinstance(record, dict) and "solver" in record and type(record.get("nfe")) is int:
                    walk({k: v for k, v in record.items() if k not in ("solver", "nfe")}, str(record["solver"]), record["nfe"])
            return
        if not isinstance(value, dict):
            return
        for key, item in value.items():
            key = str(key)
            match = NFE_KEY.match(key)
            if match and (match.group("solver") is None or match.group("solver") in SOLVERS):
                walk(item, match.group("solver") or solver, int(match.group("nfe")))
            elif key in SOLVERS:
                walk(item, key, nfe)
            elif key in ("nfe", "nfe_budget", "steps"):
                continue  # the NFE actually used, or the budget, not a quality metric
            elif solver and nfe is not None and isinstance(item, (int, float)) and not isinstance(item, bool):
                curves.setdefault((solver, key), {})[nfe] = float(item)
            else:
                walk(item, solver, nfe)

    walk(metrics, None, None)
    return curves


def git_show(root: Path, rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def plot_csvs(root: Path, rev: str, dataset: str) -> dict[str, str]:
    """Return ``{path: text}`` of the CSVs under reports/plots/DATASET/ at ``rev`` (the working tree for the workspace)."""
    folder = f"reports/plots/{dataset}"
    if rev == "workspace":
        return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted((root / folder).glob("*.csv"))}
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", folder], cwd=root, capture_output=True, text=True)
    if listing.returncode != 0:
        log.warning("git ls-tree %s %s failed: %s", rev, folder, listing.stderr.strip())
        return {}
    texts = {}
    for path in sorted(listing.stdout.splitlines()):
        if path.endswith(".csv"):
            text = git_show(root, rev, path)
            if text is not None:
                texts[path] = text
    return texts


def curves_from_csv(text: str) -> dict[tuple[str, str], dict[int, float]]:
    import pandas as pd

    frame = pd.read_csv(io.StringIO(text))
    if "nfe" not in frame or "solver" not in frame:
        return {}
    curves: dict[tuple[str, str], dict[int, float]] = {}
    for column in frame.columns:
        if column in QUALITY_METRICS:
            for solver, nfe, value in zip(frame["solver"], frame["nfe"], frame[column]):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    curves.setdefault((str(solver), column), {})[int(nfe)] = float(value)
    return curves


def experiment_curves(root: Path, row: Experiment, dataset: str, path: str) -> dict[tuple[str, str], dict[int, float]]:
    curves = curves_from_metrics(row.metrics.get(path) or {})
    if curves:
        return curves
    for csv_text in plot_csvs(root, row.rev, dataset).values():
        curves.update(curves_from_csv(csv_text))
    return curves


def choose(options: set[str], preferred: tuple[str, ...], requested: str | None) -> str | None:
    if requested:
        return requested if requested in options else None
    return next((name for name in preferred if name in options), min(options) if options else None)


def plot_comparison(root: Path, rows: list[Experiment], out: Path, solver: str | None) -> list[str]:
    """Draw quality against NFE, one panel per metrics file and one line per experiment, and return the panel titles."""
    panels = []
    for path in metrics_paths(rows):
        dataset = PurePosixPath(path).stem
        by_row = {label(row): experiment_curves(root, row, dataset, path) for row in rows}
        keys = {key for curves in by_row.values() for key in curves}
        chosen_solver = choose({s for s, _ in keys}, ("rk4", "midpoint", "heun", "euler", "dopri5"), solver)
        metric = choose({m for s, m in keys if s == chosen_solver}, QUALITY_METRICS, None)
        if chosen_solver and metric:
            lines = {name: curves[(chosen_solver, metric)] for name, curves in by_row.items() if (chosen_solver, metric) in curves}
            panels.append((dataset, chosen_solver, metric, lines))
    if not panels:
        return []

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.common import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * max(len(panels), 2), 3.8), squeeze=False)
    for ax, (dataset, chosen_solver, metric, lines) in zip(axes[0], panels):
        for name, points in lines.items():
            nfes = sorted(points)
            ax.plot(nfes, [points[n] for n in nfes], marker="o", markersize=3, label=name)
        ax.set_xscale("log", base=2)
        if all(v > 0 for points in lines.values() for v in points.values()):
            ax.set_yscale("log")
        ax.set_title(f"{dataset}: {metric} ({chosen_solver})")
        ax.set_xlabel("nfe")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[0][len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out)
    return [f"{dataset}: {metric} with {chosen_solver}" for dataset, chosen_solver, metric, _ in panels]


# ---------------------------------------------------------------- the comparison document


def _changes_text(row: Experiment) -> str:
    return ", ".join(row.changed_params) or "no parameter differs from its baseline commit"


def left_out_lines(rows: list[Experiment]) -> list[str]:
    """Return the markdown that lists the rows left out of the tables and the figure, by state."""
    lines: list[str] = []
    for row in rows:
        if row.state == "outdated":
            changes = f" ({_changes_text(row)})" if row.changed_params else ""
            lines += [f"The workspace{changes} is left out: {row.error}. Run `dvc repro` to update its outputs, or `git checkout params.yaml reports` and `dvc checkout` to return to HEAD.", ""]

    pending = [row for row in rows if row.state in PENDING_STATES]
    if pending:
        lines += ["Experiments that have not finished, left out until they do:", ""]
        lines += [f"- {label(row)}, {row.state}: {_changes_text(row)}" for row in pending] + [""]

    unreadable = [row for row in rows if row.state == "unreadable"]
    if unreadable:
        lines += ["Revisions that DVC could not read, left out:", ""]
        lines += [f"- {label(row)}: {row.error}" for row in unreadable] + [""]

    failed = [row for row in rows if row.state == "failed"]
    if failed:
        lines += ["## Failed experiments", ""]
        lines += ["These runs failed, so they have no results and are left out of the tables and the figure. `dvc queue logs NAME` prints a queued run's output.", ""]
        lines += [f"- {label(row)}: {_changes_text(row)}" for row in failed] + [""]
    return lines


def build_markdown(rows: list[Experiment], figure: Path | None, panels: list[str], output: Path) -> str:
    """Return the comparison document in markdown: the rows left out, then the parameter, metrics and NFE sections for the rest."""
    lines = ["# Comparison of experiments", ""]
    lines += ["Generated by `make compare` (tools/compare.py) from `dvc exp show --json`: the workspace when it differs from every commit and its outputs are up to date, each baseline commit and its experiments.", ""]
    lines += left_out_lines(rows)
    rows = [row for row in rows if row.state == SUCCESS]
    if not rows:
        lines += ["No commit or experiment has results to compare.", ""]
        return "\n".join(lines).rstrip("\n") + "\n"

    names = differing_params(rows)
    lines += ["## Parameters that differ", ""]
    if names:
        lines += markdown_table(["experiment", *[f"`{n}`" for n in names]], [[label(row), *(format_value(row.params.get(n)) for n in names)] for row in rows], numeric=False)
    else:
        lines += ["Every experiment has the same parameters.", ""] + [f"- {label(row)}" for row in rows] + [""]

    lines += ["## Headline metrics", ""]
    tables = [(path, headline_columns(rows, path)) for path in metrics_paths(rows)]
    tables = [(path, columns) for path, columns in tables if columns]
    if not tables:
        lines += [f"No metrics file has any of the headline metrics ({', '.join(HEADLINE_METRICS)}).", ""]
    for path, columns in tables:
        lines += [f"### `{path}`", ""]
        lines += markdown_table(["experiment", *columns], [[label(row), *(format_value((row.metrics.get(path) or {}).get(c)) for c in columns)] for row in rows])

    lines += ["## Quality against NFE", ""]
    if figure is not None and panels:
        target = os.path.relpath(figure, output.parent).replace(os.sep, "/")
        lines += [f"![Quality against NFE, one line per experiment]({target})", "", "Panels: " + "; ".join(panels) + ".", ""]
    else:
        lines += ["No experiment has per-NFE results (solver and NFE keys in its metrics, or plot CSVs with `solver` and `nfe` columns).", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a saved `dvc exp show --json` output (default: run the command, and `dvc status` to check the workspace)")
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    parser.add_argument("--output", default="reports/comparison.md", help="markdown file to write, relative to the root")
    parser.add_argument("--figure", default="reports/figures/comparison_quality_vs_nfe.png", help="figure to write, relative to the root")
    parser.add_argument("--solver", help="solver whose curves are compared (default: rk4, else the first available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    root = Path(args.root)
    try:
        if args.input:
            exp_show = read_exp_show_file(Path(args.input))
            # A saved output can be older than the working tree, so dvc status does not apply to its workspace row.
            outdated_stages = None
        else:
            exp_show = run_exp_show(root)
            outdated_stages = run_dvc_status(root)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        rows = parse_exp_show(exp_show, outdated_stages)
    except CompareError as error:
        print(f"error: {args.input or 'dvc exp show --json'}: {error}", file=sys.stderr)
        return 2
    if not rows:
        print("error: dvc exp show listed no commit or experiment", file=sys.stderr)
        return 2

    from stages.common import write_text

    compared = [row for row in rows if row.state == SUCCESS]
    figure = root / args.figure
    panels = plot_comparison(root, compared, figure, args.solver)
    output = root / args.output
    write_text(output, build_markdown(rows, figure if panels else None, panels, output))
    left_out = len(rows) - len(compared)
    left_out_text = f", left out {plural(left_out, 'row')} (failed, not finished, unreadable or outdated)" if left_out else ""
    log.info("compared %s%s; wrote %s%s", plural(len(compared), "row"), left_out_text, output, f" and {figure}" if panels else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
