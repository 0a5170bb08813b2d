"""Figures of the report (stage `report`): captions of the other stages' figures and the figures the report draws.

``caption_for`` looks a figure up by its path under reports/figures and falls back to a
generic caption for figures it does not know. The report draws the training curves
from the DVCLive logs and each data set's quality against NFE from its plot CSV.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from stages.common import save_figure
from stages.report_render import FIGURE_SUFFIXES, Document

log = logging.getLogger("flowmatch.report")

# Columns of a plot CSV that index a curve or measure time instead of quality.
NON_QUALITY_COLUMNS = {"nfe", "nfe_budget", "steps", "step", "seed", "solver", "schedule"}

INTUITION_FIGURES = (
    ("cat_denoise_example.png", "Can you denoise it? The photograph z beside its noised version x_t at one time t."),
    ("noise_sequence.png", "The photograph along the schedule, from data (t = 1) to noise (t = 0) in equal steps of t."),
    ("plot_denoise_arrow.png", "Denoising as a direction: in the plane spanned by z and eps, the arrow from x_t back to z."),
    ("plot_stepwise_path.png", "The noised images at a few times, joined in order from noise to data: denoising in discrete steps."),
    ("plot_smooth_trajectory.png", "The limit of many small steps: a smooth trajectory, coloured by t, for the study's schedule."),
    ("interpolation.gif", "Animation of x_t = alpha_t z + beta_t eps as t runs between noise and data."),
    ("which_way.gif", "Which way to go? With one data point the way back is known; with several, the conditional arrows are averaged."),
)

# Captions of the figures the other stages write, by path under reports/figures.
FIGURE_CAPTIONS = {
    "single_point/moments.png": "Mean (per coordinate) and standard deviation of X_t for one data point z: empirical values from the samples (dots) against alpha_t z and beta_t (lines).",
    "single_point/convergence.png": "RMS distance of the conditional flow's endpoint x_1 to z, against steps for the fixed-step solvers (left) and against NFE for every solver, dopri5 at each tolerance (right).",
    "single_point/trajectories.png": "Trajectories of the conditional flow from N(0, I) onto z, coloured by t (left), and their distance to z against t beside the exact path alpha_t z + beta_t x_0 (right).",
    "marginal/landing.png": "Left: samples of the exact marginal flow land on the training points it averages over. Right: distance to the nearest training point for these samples and for fresh test points, with the radius of `fraction_within_radius`.",
    "marginal/velocity_density.png": "The density p_t of the noised training points (colour, log scale relative to its peak) and streamlines of the exact marginal velocity u_t at several times t.",
    "marginal/gaussian_mc.png": "Monte Carlo estimate of the Gaussian marginal velocity: RMS error and estimated standard error against the number m of samples of z, with the slope -1/2 of an m^(-1/2) decay.",
    "marginal/gaussian_flow.png": "Samples of the closed-form Gaussian flow at t = 1 with the two-standard-deviation ellipses of N(mean, cov) and of the samples.",
    "marginal/continuity.png": "Left: relative residual of the continuity equation against the grid spacing h, with a slope-2 guide. Right: the terms d p_t/dt and -div(p_t u_t) and their residual for the 1-D mixture.",
    "marginal/solver_convergence.png": "Endpoint error of each fixed-step solver on the closed-form Gaussian flow against steps, under the reference schedule and, when it differs, the study's schedule (right), with the fitted orders.",
    "marginal/likelihood.png": "Left: error of the exact-divergence log-likelihood at each point against log N(x; mean, cov). Right: errors of the Hutchinson estimate in standard errors, with the N(0, 1) density.",
}

# Captions of the figures the evaluate stage writes under reports/figures/DATASET.
DATASET_FIGURE_CAPTIONS = {
    "samples.png": "Samples of the trained model of {dataset} with the best solver at the largest NFE budget (for 2-D data, beside held-out data).",
    "quality_vs_nfe.png": "The main distance of {dataset} against NFE, one line per solver, with its noise floor (dashed, band of one standard deviation).",
    "straightness.png": "{dataset}: E |v(x_t, t) - (x_1 - x_0)|^2 along trajectories of the learned flow against t; its time average is `straightness`, 0 for straight trajectories at constant speed.",
    "velocity_error.png": "{dataset}: relative error ||v - u_t|| / ||u_t|| of the learned velocity against the closed-form velocity over x ~ p_t, against t; its mean over t is `velocity_error`.",
}


def figures_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FIGURE_SUFFIXES)


def caption_for(path: Path, figures_root: Path) -> str:
    """Return the caption of a figure under ``figures_root`` (reports/figures): a known one, else a generic one."""
    relative = path.relative_to(figures_root).as_posix() if path.is_relative_to(figures_root) else path.name
    if relative in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[relative]
    folder, _, name = relative.rpartition("/")
    if name in DATASET_FIGURE_CAPTIONS and folder and "/" not in folder:
        return DATASET_FIGURE_CAPTIONS[name].format(dataset=folder)
    return f"Figure `{path.name}` of `{path.parent.as_posix()}`."


class FigurePlacer:
    """Place the figures of one stage's folder where a section discusses them, then the rest.

    When the folder has no figures at all, one sentence states that (unless
    ``announce_empty`` is false) instead of one per figure.
    """

    def __init__(self, doc: Document, figures_root: Path, folder: str, stage: str, announce_empty: bool = True):
        self.doc = doc
        self.figures_root = figures_root
        self.directory = figures_root / folder if folder else figures_root
        self.stage = stage
        self.placed: set[str] = set()
        self.available = bool(figures_in(self.directory))
        if not self.available and announce_empty:
            doc.paragraph(f"*No figures:* `{self.directory.as_posix()}` has none (the `{stage}` stage writes them).")

    def place(self, name: str) -> None:
        """Add the figure ``name`` of the folder with its caption, or a sentence saying it is missing."""
        self.placed.add(name)
        if self.available:
            path = self.directory / name
            self.doc.figure(path, caption_for(path, self.figures_root), self.stage)

    def skip(self, name: str) -> None:
        """Leave the figure ``name`` out, because the section shows the same data another way."""
        self.placed.add(name)

    def rest(self) -> None:
        """Add every figure of the folder not placed or skipped yet, in name order."""
        for path in figures_in(self.directory):
            if path.name not in self.placed:
                self.placed.add(path.name)
                self.doc.figure(path, caption_for(path, self.figures_root), self.stage)


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


def plot_quality_vs_nfe(csv: Path, out: Path, floors: dict[str, tuple[float, float | None]] | None = None) -> bool:
    """Plot each quality column of a plot CSV against ``nfe``, one line per solver.

    ``floors`` maps a column to its noise floor and the floor's standard deviation (or
    ``None``), drawn as a dashed line in a grey band. Returns False, and writes nothing,
    when the CSV has no ``nfe`` column or no quality column.
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
        if floors and column in floors:
            floor, spread = floors[column]
            ax.axhline(floor, color="k", linestyle="--", linewidth=1.0, label="noise floor")
            if spread:
                ax.axhspan(floor - spread, floor + spread, color="grey", alpha=0.2, linewidth=0)
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
