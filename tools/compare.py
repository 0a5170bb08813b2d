"""Compare DVC experiments: the parameters that differ, headline metrics and quality against NFE.

Reads the output of ``dvc exp show --json`` (DVC 3.x: a list of commits, each with its
own ``data`` and a list of ``experiments`` whose ``revs`` carry ``data`` with ``params``
and ``metrics``) and writes reports/comparison.md plus
reports/figures/comparison_quality_vs_nfe.png, one line per experiment.

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
from dataclasses import dataclass
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


# ---------------------------------------------------------------- reading dvc exp show


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _row(entry: dict, kind: str, fallback_name: str) -> Experiment:
    data = entry.get("data") or {}
    params: dict[str, object] = {}
    for file, content in (data.get("params") or {}).items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        params.update({prefix + key: value for key, value in flatten((content or {}).get("data") or {}).items()})
    metrics = {path: content["data"] for path, content in (data.get("metrics") or {}).items() if isinstance((content or {}).get("data"), dict)}
    # DVC 3 reports a failed experiment as {"type": ..., "msg": ...}.
    error = entry.get("error")
    message = None
    if isinstance(error, dict):
        message = error.get("msg") or error.get("type") or str(error)
    elif error:
        message = str(error)
    name = entry.get("name") or fallback_name
    return Experiment(name=name, rev=entry.get("rev") or data.get("rev") or name, params=params, metrics=metrics, kind=kind, error=message)


def parse_exp_show(exp_show: object) -> list[Experiment]:
    """Turn ``dvc exp show --json`` output into rows: each baseline commit followed by its experiments.

    The workspace is kept only when it differs from every other row, because after
    ``dvc exp run`` it contains a copy of the last experiment.
    """
    if not isinstance(exp_show, list):
        raise CompareError(f"dvc exp show --json: expected a list of commits, found {type(exp_show).__name__}")
    rows: list[Experiment] = []
    workspace: Experiment | None = None
    for commit in exp_show:
        if not isinstance(commit, dict) or "rev" not in commit:
            raise CompareError(f"dvc exp show --json: expected commit objects with a 'rev', found {str(commit)[:80]!r}")
        if commit["rev"] == "workspace":
            workspace = _row(commit, "workspace", "workspace")
            continue
        rows.append(_row(commit, "baseline", commit["rev"][:7]))
        for experiment in commit.get("experiments") or []:
            revs = experiment.get("revs") or []
            if revs:
                rows.append(_row(revs[0], "experiment", experiment.get("name") or revs[0].get("rev", "?")[:7]))
    if workspace is not None and all((workspace.params, workspace.metrics) != (row.params, row.metrics) for row in rows):
        rows.insert(0, workspace)
    return rows


def run_exp_show(root: Path) -> object:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    dvc = Path(sys.executable).with_name("dvc")
    command = [str(dvc) if dvc.exists() else "dvc", "exp", "show", "--json"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompareError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise CompareError(f"{' '.join(command)}: output is not JSON ({error})") from error


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
                if isinstance(record, dict) and "solver" in record and "nfe" in record:
                    walk({k: v for k, v in record.items() if k not in ("solver", "nfe")}, str(record["solver"]), int(record["nfe"]))
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


def build_markdown(rows: list[Experiment], figure: Path | None, panels: list[str], output: Path) -> str:
    lines = ["# Comparison of experiments", ""]
    lines += ["Generated by `make compare` (tools/compare.py) from `dvc exp show --json`: the workspace when it differs from every commit, each baseline commit and its experiments.", ""]
    failed = [row for row in rows if row.error]
    if failed:
        lines += ["Experiments whose results DVC could not read:", ""] + [f"- {label(row)}: {row.error}" for row in failed] + [""]

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
    parser.add_argument("--input", help="a saved `dvc exp show --json` output (default: run the command)")
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    parser.add_argument("--output", default="reports/comparison.md", help="markdown file to write, relative to the root")
    parser.add_argument("--figure", default="reports/figures/comparison_quality_vs_nfe.png", help="figure to write, relative to the root")
    parser.add_argument("--solver", help="solver whose curves are compared (default: rk4, else the first available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    root = Path(args.root)
    try:
        exp_show = json.loads(Path(args.input).read_text(encoding="utf-8")) if args.input else run_exp_show(root)
        rows = parse_exp_show(exp_show)
    except (OSError, json.JSONDecodeError, CompareError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows:
        print("error: dvc exp show listed no commit or experiment", file=sys.stderr)
        return 2

    from stages.common import write_text

    figure = root / args.figure
    panels = plot_comparison(root, rows, figure, args.solver)
    output = root / args.output
    write_text(output, build_markdown(rows, figure if panels else None, panels, output))
    log.info("compared %d rows; wrote %s%s", len(rows), output, f" and {figure}" if panels else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
