"""Write the study's report: reports/report.md and a self-contained reports/report.html.

The report follows the study from denoising intuition through its four mathematical
claims (the single-point flow, the marginal flow, the Gaussian case, the likelihood)
and the solvers to the results per data set. Every number in it is read from the
metrics, plot and log files of the other stages, so it regenerates with the pipeline.
A section whose metrics are missing states that in a sentence. The appendix "All metrics"
renders every metrics file generically, which makes a new metric appear without a
change here. The figures the report draws itself (loss curves, quality against NFE)
go to reports/figures/report/.

The stage is split by concept: this module assembles the sections and writes the
files, ``stages.report_claims`` writes the claim and solver sections,
``stages.report_tables`` the metric tables, ``stages.report_figures`` the captions and
the report's own figures, and ``stages.report_render`` the markdown and HTML.

For identical inputs both files are byte-identical, except the last section,
"Environment", which records versions, the device and timings of this run.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from pathlib import Path

import yaml

from flowmatch.schedules import get_schedule
from stages.common import StageError, run_stage, write_text
from stages.config import DATASETS, Params, load_params
from stages.report_claims import SOLVER_SECTION_TITLE, section_gaussian, section_likelihood, section_marginal, section_single_point, section_solvers
from stages.report_figures import INTUITION_FIGURES, FigurePlacer, figures_in, plot_loss_curves, plot_quality_vs_nfe
from stages.report_render import Document, code, format_value, render_html, slugify
from stages.report_tables import (
    FLOOR_METRICS,
    distance_table,
    flatten,
    floor_sentences,
    image_sentences,
    is_number,
    load_metrics,
    read_json,
    render_by_solver,
    render_metrics,
    straightness_sentence,
)

log = logging.getLogger("flowmatch.report")

REPORTS = Path("reports")
# Figures the report draws itself, relative to the reports directory.
OWN_FIGURES = Path("figures") / "report"
ENVIRONMENT_TITLE = "Environment"

CLAIM_TITLES = (
    "Claim 1: the single-point flow",
    "Claim 2: the marginal flow",
    "Claim 3: the Gaussian case",
    "Claim 4: the likelihood",
)
RESULTS_TITLE = "Results per data set"
APPENDIX_TITLE = "All metrics"

# Metrics files of the stages with sections of their own, in the order of the appendix.
STAGE_METRICS = ("single_point", "marginal_flow", "classifier")

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


def section_results(doc: Document, reports: Path, dataset_metrics: dict[str, dict]) -> None:
    doc.heading(2, RESULTS_TITLE)
    doc.paragraph(
        "Samples come from the trained models through each solver and NFE budget. For low-dimensional data w2 is the exact "
        "2-Wasserstein distance to held-out data, energy the energy distance and mmd the maximum mean discrepancy. For images "
        "fid is the Frechet distance in the feature space of the classifier trained in the pipeline. Each distance stands "
        "beside its noise floor: the same distance between two independent sample sets of the true distribution (mean ± "
        "standard deviation over seeds), the best any model can score. The headline values are those of the best solver at "
        "the largest NFE budget."
    )
    if not dataset_metrics:
        doc.paragraph(f"*Not available:* no per-data-set metrics in `{(reports / 'metrics').as_posix()}` (the `evaluate` stage writes them).")
        return
    distance_table(doc, dataset_metrics)
    sentence = straightness_sentence(dataset_metrics)
    if sentence is not None:
        doc.paragraph(sentence)
    else:
        doc.paragraph("*Not available:* no data set has both `straightness` and Euler runs in `by_solver`, so straightness cannot be related to quality at low NFE.")
    for name, metrics in dataset_metrics.items():
        render_dataset(doc, reports, name, metrics)
        if name == "digits":
            path = reports / "metrics" / "classifier.json"
            if path.is_file():
                doc.paragraph("The classifier whose features and labels the image metrics use:")
                render_metrics(doc, load_metrics(doc, path, "classifier"), path)


def render_dataset(doc: Document, reports: Path, name: str, metrics: dict) -> None:
    """Write one data set's subsection: floor sentences, quality per solver and budget, figures."""
    doc.heading(3, name)
    for sentence in floor_sentences(metrics) + image_sentences(metrics):
        doc.paragraph(sentence)
    if is_number(metrics.get("straightness")):
        doc.paragraph(f"The learned flow's straightness is {format_value(metrics['straightness'])} (0 for straight trajectories at constant speed).")
    by_solver = metrics.get("by_solver")
    if isinstance(by_solver, dict) and by_solver:
        render_by_solver(doc, by_solver)

    figures = FigurePlacer(doc, reports / "figures", name, "evaluate", announce_empty=False)
    if (reports / "figures" / name / "samples.png").is_file():
        figures.place("samples.png")
    floors = {key: (float(metrics[f"{key}_floor"]), metrics.get(f"{key}_floor_std")) for key in FLOOR_METRICS if is_number(metrics.get(f"{key}_floor"))}
    for csv in sorted((reports / "plots" / name).glob("*.csv")):
        out = reports / OWN_FIGURES / f"{name}_{csv.stem}.png"
        if plot_quality_vs_nfe(csv, out, floors):
            doc.figure(out, f"Every quality metric of {name} against NFE, one line per solver; the dashed line and grey band are the noise floor ± one standard deviation where the metrics have one (from `{csv.as_posix()}`).")
            # The report's plot shows the same data as the evaluate stage's own figure, and more.
            figures.skip(f"{csv.stem}.png")
    if name == "gaussian":
        figures.skip("velocity_error.png")
    figures.rest()


def dataset_names(reports: Path) -> list[str]:
    """Data sets of the study that have metrics or plot data, in study order."""
    found = {p.stem for p in (reports / "metrics").glob("*.json")} | {p.name for p in (reports / "plots").glob("*") if p.is_dir()}
    return [name for name in DATASETS if name in found]


def read_dataset_metrics(reports: Path, names: list[str]) -> dict[str, dict]:
    """Return the metrics object of each data set in ``names`` that has a metrics file."""
    found = {}
    for name in names:
        path = reports / "metrics" / f"{name}.json"
        if path.is_file():
            metrics = read_json(path)
            if not isinstance(metrics, dict):
                raise StageError(f"{path}: expected a JSON object of metrics, found {type(metrics).__name__}")
            found[name] = metrics
    return found


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


def section_all_metrics(doc: Document, reports: Path, names: list[str]) -> None:
    """Render every metrics file generically; per-data-set ``by_solver`` objects are in the results already."""
    doc.heading(2, APPENDIX_TITLE)
    doc.paragraph("Every value of every metrics file, as the stages wrote it (4 significant digits).")
    order = [*STAGE_METRICS, *names]
    paths = sorted((reports / "metrics").glob("*.json"), key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))
    if not paths:
        doc.paragraph(f"*Not available:* `{(reports / 'metrics').as_posix()}` has no metrics files.")
    for path in paths:
        doc.heading(3, path.stem)
        metrics = load_metrics(doc, path, "unknown")
        if metrics is not None:
            render_metrics(doc, metrics, path, skip=("by_solver",) if path.stem in names else ())


# ---------------------------------------------------------------- the report


def build_markdown(params: Params, raw_params: dict, reports: Path = REPORTS) -> str:
    """Build the report's markdown, with figure links relative to ``reports``."""
    doc = Document(base=reports)
    doc.heading(1, "Flow matching: from Gaussian noise to data")
    doc.paragraph(
        "This report is generated by the `report` stage of the DVC pipeline from the metrics, plot data and figures of the other "
        "stages; `dvc repro` rebuilds it from `params.yaml`. It checks four mathematical claims of flow matching numerically, "
        "each in its own section with the numbers that support it: the flow of a single data point, the marginal flow of a "
        "data distribution, the closed-form Gaussian case, and the log-likelihood through the instantaneous change of "
        "variables. It then measures the ODE solvers and reports the quality of the trained models on each data set."
    )
    names = dataset_names(reports)
    dataset_metrics = read_dataset_metrics(reports, names)
    single, marginal, gaussian, likelihood = CLAIM_TITLES
    titles = ["Schedule", "Denoising intuition", single, marginal, "Training", gaussian, likelihood, SOLVER_SECTION_TITLE, RESULTS_TITLE, "Parameters", APPENDIX_TITLE, ENVIRONMENT_TITLE]
    section_contents(doc, titles)

    section_schedule(doc, params)
    section_intuition(doc, reports)
    section_single_point(doc, reports, params, single)
    section_marginal(doc, reports, params, marginal)
    section_training(doc, reports)
    section_gaussian(doc, reports, params, gaussian)
    section_likelihood(doc, reports, dataset_metrics, likelihood)
    section_solvers(doc, reports)
    section_results(doc, reports, dataset_metrics)
    section_parameters(doc, raw_params)
    section_all_metrics(doc, reports, names)
    # Keep the environment last: it is the only part that varies between identical runs.
    section_environment(doc, reports)
    return doc.text()


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
