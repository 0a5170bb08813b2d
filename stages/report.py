"""Write the study's report: reports/report.md and a self-contained reports/report.html.

The report follows the study from denoising intuition to results. Every number in it
is read from the metrics, plot and log files of the other stages, so it regenerates
with the pipeline. Metrics files are rendered generically (scalars as a list, nested
objects as tables), which makes a new metric appear without a change here. The
figures the report draws itself (loss curves, quality against NFE) go to
reports/figures/report/.

For identical inputs both files are byte-identical, except the last section,
"Environment", which records versions, the device and timings of this run.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowmatch.schedules import get_schedule
from stages.common import StageError, run_stage, save_figure, write_text
from stages.config import DATASETS, Params, load_params

log = logging.getLogger("flowmatch.report")

REPORTS = Path("reports")
# Figures the report draws itself, relative to the reports directory.
OWN_FIGURES = Path("figures") / "report"
MAX_FIGURE_BYTES = 2 * 1024 * 1024
ENVIRONMENT_TITLE = "Environment"

# Metrics files that have a section of their own. Any other file in reports/metrics/
# that does not belong to a data set goes to the section "Other metrics".
SECTION_METRICS = ("single_point", "marginal_flow", "classifier", "gaussian")

# Headline metrics of the summary table across data sets, in column order. A column
# appears when at least one data set has that top-level key.
HEADLINE_KEYS = (
    "solver", "nfe", "w2", "w2_floor", "w2_floor_std", "energy", "energy_floor", "mmd", "mmd_floor",
    "nll", "straightness", "fid", "fid_floor", "entropy", "memorisation", "accuracy",
)

# Distances that come with a noise floor ``NAME_floor`` (and ``NAME_floor_std``).
FLOOR_METRICS = ("w2", "energy", "mmd", "fid")

# Columns of a plot CSV that index a curve or measure time instead of quality.
NON_QUALITY_COLUMNS = {"nfe", "nfe_budget", "steps", "step", "seed", "solver", "schedule"}

MIME_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
FIGURE_SUFFIXES = tuple(MIME_TYPES)

INTUITION_FIGURES = (
    ("cat_denoise_example.png", "Can you denoise it? The photograph z beside its noised version x_t at one time t."),
    ("noise_sequence.png", "The photograph along the schedule, from data (t = 1) to noise (t = 0) in equal steps of t."),
    ("plot_denoise_arrow.png", "Denoising as a direction: in the plane spanned by z and eps, the arrow from x_t back to z."),
    ("plot_stepwise_path.png", "The noised images at a few times, joined in order from noise to data: denoising in discrete steps."),
    ("plot_smooth_trajectory.png", "The limit of many small steps: a smooth trajectory, coloured by t, for the study's schedule."),
    ("interpolation.gif", "Animation of x_t = alpha_t z + beta_t eps as t runs between noise and data."),
    ("which_way.gif", "Which way to go? With one data point the way back is known; with several, the conditional arrows are averaged."),
)


# ---------------------------------------------------------------- markdown document


@dataclass
class Document:
    """A markdown document under construction, with the figures it references."""

    base: Path
    lines: list[str] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.lines += ["#" * level + " " + text, ""]

    def paragraph(self, text: str) -> None:
        self.lines += [text, ""]

    def bullets(self, items: Iterable[str]) -> None:
        self.lines += [f"- {item}" for item in items] + [""]

    def table(self, header: list[str], rows: list[list[str]], align_right_from: int = 1) -> None:
        """Append a table; columns from ``align_right_from`` on are right-aligned (numbers)."""
        rule = ["---" if i < align_right_from else "---:" for i in range(len(header))]
        self.lines.append(_table_row(header))
        self.lines.append(_table_row(rule))
        self.lines += [_table_row(row) for row in rows]
        self.lines.append("")

    def figure(self, path: Path, caption: str, stage: str = "") -> None:
        """Reference the figure at ``path`` if it exists and is under the size limit, else write why it is left out."""
        if not path.is_file():
            writer = f" (the `{stage}` stage writes it)" if stage else ""
            self.paragraph(f"*Missing figure:* `{path.as_posix()}` does not exist{writer}. {caption}")
            return
        size = path.stat().st_size
        if size >= MAX_FIGURE_BYTES:
            log.warning("%s is %d bytes, over the %d-byte limit; not embedded", path, size, MAX_FIGURE_BYTES)
            self.paragraph(f"*Figure left out:* `{path.as_posix()}` is {size / 2**20:.1f} MiB, over the 2 MiB limit. {caption}")
            return
        target = os.path.relpath(path, self.base).replace(os.sep, "/")
        self.lines += [f"![{_escape_alt(caption)}]({target})", "", f"*{caption}*", ""]

    def text(self) -> str:
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _escape_alt(text: str) -> str:
    return re.sub(r"([\[\]\\*_`])", r"\\\1", text)


def format_value(value: object) -> str:
    """Format a metric value for the report: 4 significant digits for floats, JSON-like otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


def code(name: str) -> str:
    return f"`{name}`"


# ---------------------------------------------------------------- reading inputs


def read_json(path: Path) -> object:
    """Read a JSON file, raising ``StageError`` naming it when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise StageError(f"{path}: cannot read the JSON file ({error}); rerun the stage that writes it") from error


def is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def is_leaf_mapping(value: object) -> bool:
    """True for a non-empty dict whose values are scalars or lists of scalars."""
    return isinstance(value, dict) and bool(value) and all(is_scalar(v) or (isinstance(v, list) and all(is_scalar(i) for i in v)) for v in value.values())


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Flatten nested dicts into ``{"a.b.c": leaf}``. Lists are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(item, name))
    return flat


def leaf_mappings(value: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """Return ``(path, leaf dict)`` for every leaf dict below ``value``, depth first in key order."""
    found: list[tuple[str, dict]] = []
    scalars = {key: item for key, item in value.items() if not isinstance(item, dict)}
    if scalars:
        found.append((prefix, scalars))
    for key, item in value.items():
        if isinstance(item, dict):
            found += leaf_mappings(item, f"{prefix}.{key}" if prefix else str(key))
    return found


# ---------------------------------------------------------------- generic metrics rendering


def render_metrics(doc: Document, metrics: dict, source: Path) -> None:
    """Render every value of a metrics object: top-level scalars as one table, nested objects as tables.

    A top-level dict whose values are all scalars becomes one row of a table shared
    with the other such dicts that have the same keys (for example per-solver orders
    and errors). A deeper object becomes a table whose rows are the paths to its leaf
    dicts and whose columns are their keys (for example solver and NFE by metric).
    """
    scalars = [(key, value) for key, value in metrics.items() if not isinstance(value, dict)]
    doc.paragraph(f"From `{source.as_posix()}`:")
    if scalars:
        doc.table(["metric", "value"], [[code(key), format_value(value)] for key, value in scalars])

    groups: dict[tuple[str, ...], list[tuple[str, dict]]] = {}
    for key, value in metrics.items():
        if is_leaf_mapping(value):
            groups.setdefault(tuple(value), []).append((key, value))
    for columns, members in groups.items():
        doc.table(["metric", *columns], [[code(key), *(format_value(value[c]) for c in columns)] for key, value in members])

    for key, value in metrics.items():
        if isinstance(value, dict) and not is_leaf_mapping(value) and value:
            render_nested_table(doc, key, value)


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers by value: ``steps_2`` before ``steps_16``."""
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part) for part in re.split(r"(\d+(?:\.\d+)?)", text)]


def render_nested_table(doc: Document, name: str, value: dict) -> None:
    rows = sorted(leaf_mappings(value), key=lambda row: natural_key(row[0]))
    columns = sorted({key for _, leaf in rows for key in leaf}, key=natural_key)
    doc.paragraph(f"{code(name)}:")
    doc.table([name, *columns], [[path or "(top)", *(format_value(leaf[c]) if c in leaf else "" for c in columns)] for path, leaf in rows])


def load_metrics(doc: Document, path: Path, stage: str) -> dict | None:
    """Read a metrics file, or write in the document which stage produces it when it is missing."""
    if not path.is_file():
        doc.paragraph(f"*Not available:* `{path.as_posix()}` is missing (the `{stage}` stage writes it).")
        return None
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise StageError(f"{path}: expected a JSON object of metrics, found {type(metrics).__name__}")
    return metrics


def figures_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FIGURE_SUFFIXES)


def render_figure_dir(doc: Document, directory: Path, stage: str) -> None:
    figures = figures_in(directory)
    if not figures:
        doc.paragraph(f"*No figures:* `{directory.as_posix()}` has none (the `{stage}` stage writes them).")
    for path in figures:
        doc.figure(path, f"Figure `{path.name}` of `{directory.as_posix()}`.")


# ---------------------------------------------------------------- figures the report draws


def plot_loss_curves(train_dir: Path, out: Path) -> list[tuple[str, str, int, float]]:
    """Plot every DVCLive metric history under ``train_dir/*/plots/metrics`` and return final values.

    Returns ``(dataset, metric, last step, last value)`` per curve, sorted. ``out`` is
    written only when there is at least one curve.
    """
    import pandas as pd

    curves: dict[str, dict[str, "pd.DataFrame"]] = {}
    for tsv in sorted(train_dir.glob("*/plots/metrics/**/*.tsv")):
        dataset = tsv.relative_to(train_dir).parts[0]
        metric = tsv.relative_to(train_dir / dataset / "plots" / "metrics").with_suffix("").as_posix()
        frame = pd.read_csv(tsv, sep="\t")
        value_column = metric.rsplit("/", 1)[-1]
        if "step" not in frame or value_column not in frame or frame.empty:
            log.warning("%s: no 'step' and '%s' columns; skipped", tsv, value_column)
            continue
        curves.setdefault(metric, {})[dataset] = frame[["step", value_column]].rename(columns={value_column: "value"})
    if not curves:
        return []

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * max(len(curves), 2), 3.6), squeeze=False)
    finals = []
    for ax, (metric, by_dataset) in zip(axes[0], sorted(curves.items())):
        for dataset, frame in sorted(by_dataset.items()):
            ax.plot(frame["step"], frame["value"], label=dataset, linewidth=1.2)
            finals.append((dataset, metric, int(frame["step"].iloc[-1]), float(frame["value"].iloc[-1])))
        if all((frame["value"] > 0).all() for frame in by_dataset.values()):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[0][len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out)
    return sorted(finals)


def plot_quality_vs_nfe(csv: Path, out: Path) -> bool:
    """Plot each quality column of a plot CSV against ``nfe``, one line per solver.

    Returns False, and writes nothing, when the CSV has no ``nfe`` column or no quality column.
    """
    import pandas as pd

    frame = pd.read_csv(csv)
    if "nfe" not in frame or frame.empty:
        return False
    columns = [c for c in frame.columns if c not in NON_QUALITY_COLUMNS and not _is_timing(c) and pd.api.types.is_numeric_dtype(frame[c])]
    if not columns:
        return False

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = min(len(columns), 3)
    rows = math.ceil(len(columns) / per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(4.2 * max(per_row, 2), 3.4 * rows), squeeze=False)
    groups = sorted(frame.groupby("solver")) if "solver" in frame else [("all", frame)]
    for ax, column in zip(axes.flat, columns):
        for solver, group in groups:
            group = group.sort_values("nfe")
            ax.plot(group["nfe"], group[column], marker="o", markersize=3, label=str(solver))
        ax.set_xscale("log", base=2)
        if (frame[column] > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("nfe")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(csv.as_posix())
    fig.tight_layout()
    save_figure(fig, out)
    return True


def _is_timing(column: str) -> bool:
    return "second" in column or column.endswith("_time") or column == "time"


# ---------------------------------------------------------------- sections


def section_contents(doc: Document, titles: list[str]) -> None:
    doc.heading(2, "Contents")
    doc.bullets(f"[{title}](#{slugify(title)})" for title in titles)


def section_schedule(doc: Document, params: Params) -> None:
    schedule = params.schedule.build()
    vp = get_schedule("vp", beta_min=params.schedule.vp_beta_min, beta_max=params.schedule.vp_beta_max)
    doc.heading(2, "Schedule")
    doc.paragraph(
        "Time runs from noise (t = 0) to data (t = 1) along x_t = alpha_t z + beta_t eps, "
        "with eps ~ N(0, I) and z a data point. "
        f"This report was produced with the schedule {code(schedule.name)} ({code(repr(schedule))}), "
        f"whose alpha_0 = {format_value(schedule.alpha_0_gap)}."
    )
    doc.paragraph(
        f"The diffusion schedule {code('vp')} (beta_min = {format_value(vp.beta_min)}, beta_max = {format_value(vp.beta_max)}) "
        f"reaches alpha_0 = exp(-(beta_min + beta_max) / 4) = {format_value(vp.alpha_0_gap)} instead of 0: "
        "the noised distribution at t = 0 still contains alpha_0 z, while sampling starts from pure noise N(0, I)."
    )


def section_intuition(doc: Document, reports: Path) -> None:
    doc.heading(2, "Denoising intuition")
    doc.paragraph(
        "A generative model turns noise into data. Removing noise step by step suggests a direction at every "
        "point, and in the limit of small steps the steps become the velocity field of an ODE whose solution "
        "carries noise at t = 0 to data at t = 1."
    )
    for name, caption in INTUITION_FIGURES:
        doc.figure(reports / "figures" / name, caption, "noise_sequence")


def section_single_point(doc: Document, reports: Path) -> None:
    doc.heading(2, "The single-point flow")
    doc.paragraph(
        "For one data point z the path x_t ~ N(alpha_t z, beta_t^2 I) has the conditional velocity "
        "u_t(x|z) = d_alpha z + d_beta eps, and its flow carries N(0, I) onto z. The stage checks the "
        "marginals empirically and measures each solver's endpoint error against the number of steps; the "
        "convergence order is the slope of that error in log-log axes."
    )
    metrics = load_metrics(doc, reports / "metrics" / "single_point.json", "single_point")
    if metrics is not None:
        orders = metrics.get("order")
        if is_leaf_mapping(orders):
            measured = ", ".join(f"{solver} {format_value(value)}" for solver, value in orders.items())
            doc.paragraph(f"Measured convergence orders (`order`, the slope of log endpoint error against log steps): {measured}.")
        render_metrics(doc, metrics, reports / "metrics" / "single_point.json")
    render_figure_dir(doc, reports / "figures" / "single_point", "single_point")


def section_marginal(doc: Document, reports: Path) -> None:
    doc.heading(2, "The marginal flow")
    doc.paragraph(
        "Averaging the conditional velocities with the posterior weights of the data points gives the "
        "marginal velocity u_t(x) = E[u_t(x|Z) | X_t = x], whose flow transports noise to the data "
        "distribution itself."
    )
    metrics = load_metrics(doc, reports / "metrics" / "marginal_flow.json", "marginal_flow")
    if metrics is not None:
        render_metrics(doc, metrics, reports / "metrics" / "marginal_flow.json")
    render_figure_dir(doc, reports / "figures" / "marginal", "marginal_flow")


def section_training(doc: Document, reports: Path) -> None:
    doc.heading(2, "Training")
    doc.paragraph(
        "Conditional flow matching regresses a network v(x_t, t) onto u_t(x_t|z) for random t, z and eps. "
        "The curves below are the DVCLive logs of each data set's training run."
    )
    out = reports / OWN_FIGURES / "loss_curves.png"
    finals = plot_loss_curves(reports / "train", out)
    if not finals:
        doc.paragraph(f"*Not available:* no DVCLive logs under `{(reports / 'train').as_posix()}` (the `train` stage writes them).")
        return
    doc.figure(out, "Training curves logged by DVCLive, one line per data set.")
    doc.table(["data set", "metric", "last step", "last value"], [[name, code(metric), str(step), format_value(value)] for name, metric, step, value in finals], align_right_from=2)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def floor_sentences(metrics: dict) -> list[str]:
    """Compare each distance that has a noise floor (``w2``, ``fid``, ...) with that floor, one sentence each.

    The floor is the same distance between independent draws of the true distribution,
    the best any model can score. Only top-level numbers are used.
    """
    sentences = []
    where = ""
    if "solver" in metrics and is_number(metrics.get("nfe")):
        where = f" for the best sample set at the largest NFE budget (solver {code(str(metrics['solver']))}, nfe = {format_value(metrics['nfe'])})"
    for name in FLOOR_METRICS:
        value, floor = metrics.get(name), metrics.get(f"{name}_floor")
        if not is_number(value) or not is_number(floor):
            continue
        spread_key = next((key for key in (f"{name}_floor_std", f"{name}_floor_spread") if is_number(metrics.get(key))), None)
        spread = f" (standard deviation {format_value(metrics[spread_key])} over seeds)" if spread_key else ""
        ratio = f", so the model is at {format_value(value / floor)} times the floor" if floor > 0 else ""
        sentences.append(f"{name} = {format_value(value)}{where}, against a noise floor {name}_floor = {format_value(floor)}{spread}{ratio}.")
        where = ""
    return sentences


def image_sentences(metrics: dict) -> list[str]:
    """Describe class balance and memorisation of generated images, when the metrics have them."""
    sentences = []
    if is_number(metrics.get("entropy")) and is_number(metrics.get("entropy_max")):
        heldout = f", held-out images {format_value(metrics['entropy_heldout'])}" if is_number(metrics.get("entropy_heldout")) else ""
        sentences.append(
            f"The predicted classes of the samples have entropy {format_value(metrics['entropy'])} "
            f"(uniform classes {format_value(metrics['entropy_max'])}{heldout})."
        )
    if is_number(metrics.get("memorisation")) and is_number(metrics.get("memorisation_reference")):
        spread = f" ± {format_value(metrics['memorisation_reference_std'])}" if is_number(metrics.get("memorisation_reference_std")) else ""
        sentences.append(
            f"The memorisation ratio (median distance of samples to their nearest training image over that of "
            f"held-out images) is {format_value(metrics['memorisation'])}, against {format_value(metrics['memorisation_reference'])}{spread} "
            "for held-out images. A ratio well below the reference means samples copy training images."
        )
    return sentences


def render_dataset(doc: Document, reports: Path, name: str, level: int = 3) -> None:
    doc.heading(level, name)
    path = reports / "metrics" / f"{name}.json"
    metrics = load_metrics(doc, path, "evaluate")
    if metrics is not None:
        for sentence in floor_sentences(metrics) + image_sentences(metrics):
            doc.paragraph(sentence)
        render_metrics(doc, metrics, path)
    for csv in sorted((reports / "plots" / name).glob("*.csv")):
        out = reports / OWN_FIGURES / f"{name}_{csv.stem}.png"
        if plot_quality_vs_nfe(csv, out):
            doc.figure(out, f"Quality against NFE from `{csv.as_posix()}`, one line per solver.")
    for figure in figures_in(reports / "figures" / name):
        doc.figure(figure, f"Figure `{figure.name}` of the data set {name}.")


def section_gaussian(doc: Document, reports: Path) -> None:
    doc.heading(2, "The Gaussian case")
    doc.paragraph(
        "For Gaussian data the marginal velocity is affine in x and known in closed form, so the learned "
        "velocity can be compared with the exact one; the error below is measured against that closed form."
    )
    render_dataset(doc, reports, "gaussian", level=3)


def summary_table(doc: Document, reports: Path, names: list[str]) -> None:
    """Tabulate the headline metrics of the data sets, one table per set of metrics they share (toys, images)."""
    groups: dict[tuple[str, ...], dict[str, dict]] = {}
    for name in names:
        path = reports / "metrics" / f"{name}.json"
        metrics = read_json(path) if path.is_file() else None
        if isinstance(metrics, dict):
            columns = tuple(key for key in HEADLINE_KEYS if key in metrics and is_scalar(metrics[key]))
            if columns:
                groups.setdefault(columns, {})[name] = metrics
    if not groups:
        return

    doc.paragraph("Headline metrics of each data set (lower is better for distances and NLL):")
    for columns, rows in groups.items():
        doc.table(["data set", *columns], [[name, *(format_value(m[c]) for c in columns)] for name, m in rows.items()])


def section_results(doc: Document, reports: Path) -> None:
    doc.heading(2, "Results per data set")
    doc.paragraph(
        "Samples come from the trained models through each solver and NFE budget. For low-dimensional data "
        "w2 is the exact 2-Wasserstein distance to held-out data and w2_floor the same distance between two "
        "independent sample sets of the true distribution. For images the distances use the features of the "
        "classifier trained in the pipeline."
    )
    names = [name for name in dataset_names(reports) if name != "gaussian"]
    if not names:
        doc.paragraph(f"*Not available:* no per-data-set metrics in `{(reports / 'metrics').as_posix()}` (the `evaluate` stage writes them).")
        return
    summary_table(doc, reports, names)
    for name in names:
        render_dataset(doc, reports, name)
        if name == "digits":
            path = reports / "metrics" / "classifier.json"
            if path.is_file():
                doc.paragraph("The classifier whose features and labels the image metrics use:")
                render_metrics(doc, load_metrics(doc, path, "classifier"), path)


def dataset_names(reports: Path) -> list[str]:
    """Data sets of the study that have metrics or plot data, in study order."""
    found = {p.stem for p in (reports / "metrics").glob("*.json")} | {p.name for p in (reports / "plots").glob("*") if p.is_dir()}
    return [name for name in DATASETS if name in found]


def section_parameters(doc: Document, raw_params: dict) -> None:
    doc.heading(2, "Parameters")
    doc.paragraph("The values of `params.yaml` that produced this report:")
    doc.table(["parameter", "value"], [[code(key), format_value(value)] for key, value in flatten(raw_params).items()], align_right_from=2)


def section_environment(doc: Document, reports: Path) -> None:
    """Describe this run's software, hardware and timings: the only part that varies between runs."""
    import torch

    doc.heading(2, ENVIRONMENT_TITLE)
    doc.paragraph("This section describes the machine that ran the pipeline; it differs between runs.")
    versions = [("Python", platform.python_version())] + [(name, _version(name)) for name in ("torch", "numpy", "dvc", "dvclive", "matplotlib", "pot")]
    device = f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only (no CUDA device)"
    rows = [[name, version] for name, version in versions] + [["device", device], ["CPU count", str(os.cpu_count())], ["platform", platform.platform()]]
    doc.table(["item", "value"], rows, align_right_from=2)

    timing_rows = []
    for path in sorted((reports / "timing").glob("*.json")):
        timing = read_json(path)
        for key, value in flatten(timing).items() if isinstance(timing, dict) else []:
            timing_rows.append([path.stem, code(key), format_value(value)])
    if timing_rows:
        doc.paragraph("Timings of the stages:")
        doc.table(["file", "quantity", "value"], timing_rows, align_right_from=2)
    else:
        doc.paragraph(f"*Not available:* no timings in `{(reports / 'timing').as_posix()}`.")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def section_other_metrics(doc: Document, reports: Path, known: set[str]) -> None:
    others = [p for p in sorted((reports / "metrics").glob("*.json")) if p.stem not in known]
    if not others:
        return
    doc.heading(2, "Other metrics")
    for path in others:
        doc.heading(3, path.stem)
        metrics = load_metrics(doc, path, "unknown")
        if metrics is not None:
            render_metrics(doc, metrics, path)


# ---------------------------------------------------------------- the report


def build_markdown(params: Params, raw_params: dict, reports: Path = REPORTS) -> str:
    """Build the report's markdown, with figure links relative to ``reports``."""
    doc = Document(base=reports)
    doc.heading(1, "Flow matching: from Gaussian noise to data")
    doc.paragraph(
        "This report is generated by the `report` stage of the DVC pipeline from the metrics, plot data and "
        "figures of the other stages; `dvc repro` rebuilds it from `params.yaml`."
    )
    titles = ["Schedule", "Denoising intuition", "The single-point flow", "The marginal flow", "Training", "The Gaussian case", "Results per data set"]
    names = dataset_names(reports)
    known = set(names) | set(SECTION_METRICS)
    has_others = any(p.stem not in known for p in (reports / "metrics").glob("*.json"))
    titles += (["Other metrics"] if has_others else []) + ["Parameters", ENVIRONMENT_TITLE]
    section_contents(doc, titles)

    section_schedule(doc, params)
    section_intuition(doc, reports)
    section_single_point(doc, reports)
    section_marginal(doc, reports)
    section_training(doc, reports)
    section_gaussian(doc, reports)
    section_results(doc, reports)
    section_other_metrics(doc, reports, known)
    section_parameters(doc, raw_params)
    # Keep the environment last: it is the only part that varies between identical runs.
    section_environment(doc, reports)
    return doc.text()


def slugify(title: str) -> str:
    """Anchor of a heading as GitHub makes it: lower case, punctuation removed, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return slug.replace(" ", "-")


def data_uri(path: Path) -> str:
    mime = MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise StageError(f"{path}: cannot embed a figure of type '{path.suffix}'; accepted: {', '.join(MIME_TYPES)}")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5; color: #222; }
h1, h2, h3 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; white-space: nowrap; }
th { background: #f3f3f3; }
code { font-size: 0.9em; background: #f5f5f5; padding: 0 0.2rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem auto; }
""".strip()


def render_html(markdown_text: str, base: Path) -> str:
    """Render the report's markdown to one HTML page: figures become data URIs, headings get anchors."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = parser.parse(markdown_text)
    used: dict[str, int] = {}
    title = "Report"
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            text = tokens[index + 1].content
            slug = slugify(text)
            count = used.get(slug, 0)
            used[slug] = count + 1
            token.attrSet("id", slug if count == 0 else f"{slug}-{count}")
            if token.tag == "h1":
                title = text
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", data_uri(base / str(child.attrGet("src"))))
    body = parser.renderer.render(tokens, parser.options, {})
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_report(params: Params, raw_params: dict, reports: Path = REPORTS) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` under ``reports`` and return their paths."""
    # Figures of an earlier run must not linger when their inputs are gone.
    for stale in figures_in(reports / OWN_FIGURES):
        stale.unlink()
    markdown_text = build_markdown(params, raw_params, reports)
    md_path, html_path = reports / "report.md", reports / "report.html"
    write_text(md_path, markdown_text)
    write_text(html_path, render_html(markdown_text, reports))
    log.info("wrote %s (%d bytes) and %s (%d bytes)", md_path, md_path.stat().st_size, html_path, html_path.stat().st_size)
    return md_path, html_path


def main() -> None:
    params = load_params()
    raw_params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    write_report(params, raw_params)


if __name__ == "__main__":
    run_stage(main)
