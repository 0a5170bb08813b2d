"""The report stage on small hand-made inputs in a temporary directory."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import yaml

from stages import report, report_figures, report_render, report_tables

REPO = Path(__file__).resolve().parents[1]


def write_png(path: Path, size: tuple[int, int] = (12, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    Image.fromarray(pixels).save(path)


def write_gif(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (10, 6), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


# The layout the evaluate stage writes: the best set's values on top, every set under by_solver.
MOONS = {
    "solver": "rk4",
    "nfe": 16,
    "nfe_budget": 16,
    "w2": 0.0812,
    "w2_floor": 0.0401,
    "w2_floor_std": 0.0032,
    "energy": 0.0021,
    "nll": 1.234,
    "nll_per_dim": 0.617,
    "nll_t_end": 1.0,
    "straightness": 0.0543,
    "by_solver": {
        "dopri5": {"nfe16": {"nfe": 14, "w2": 0.0851, "energy": 0.0024}},
        "euler": {"nfe4": {"nfe": 4, "w2": 0.31, "energy": 0.05}, "nfe16": {"nfe": 16, "w2": 0.12, "energy": 0.01}},
        "rk4": {"nfe4": {"nfe": 4, "w2": 0.09, "energy": 0.003}, "nfe16": {"nfe": 16, "w2": 0.0813, "energy": None}},
    },
}
CHECKERBOARD = {
    "solver": "euler",
    "nfe": 16,
    "w2": 0.1,
    "w2_floor": 0.09,
    "straightness": 0.21,
    "by_solver": {"euler": {"nfe4": {"nfe": 4, "w2": 0.5}, "nfe16": {"nfe": 16, "w2": 0.1}}},
}
GAUSSIAN = {
    "solver": "rk4",
    "nfe": 16,
    "w2": 0.02,
    "w2_floor": 0.018,
    "nll": 2.5012,
    "nll_true": 2.4987,
    "velocity_error": 0.00456,
    "velocity_error_max": 0.0213,
}
SINGLE_POINT = {
    "mean_error_max_se": 1.546,
    "mean_error_rms_se": 0.7549,
    "cov_error_max_se": 2.392,
    "cov_error_rms_se": 1.293,
    "order": {"euler": 1.01, "rk4": 3.98},
    "endpoint_error": {"dopri5": {"tol_1e-03": 1.1e-08}, "euler": {"steps_2": 0.62, "steps_16": 0.0097}, "rk4": {"steps_2": 0.23, "steps_16": 1.5e-7}},
    "endpoint_nfe": {"dopri5": {"tol_1e-03": 1022}},
}
MARGINAL_FLOW = {
    "memorisation": {"fraction_within_radius": 0.998, "test_fraction_within_radius": 0.045, "nearest_distance_median": 1.77e-10, "nearest_distance_max": 6.53e-10, "test_nearest_distance_median": 0.0429},
    "gaussian_mc": {"m": 100000, "error_rms": 0.0097, "standard_error_rms": 0.01006, "z_rms": 1.059, "z_max": 2.976, "error_slope": -0.4868, "ess_min": 1267.0},
    "gaussian_flow": {"mean_error_max_se": 0.4262, "cov_error_max_se": 0.4833, "solver_error_rms": 6.23e-06},
    "continuity": {"residual_1d": 0.003163, "residual_2d": 0.006252, "order_1d": 1.992, "order_2d": 1.921},
    "solver_order": {"euler": 0.9841, "heun": 1.966, "midpoint": 2.054, "rk4": 4.082},
    "solver_order_study": {"euler": 0.9872, "heun": 1.95, "midpoint": 2.997, "rk4": 4.296},
    "solver_order_schedules": {"reference": "cosine", "study": "linear"},
    "likelihood_error_max": 6.59e-10,
    "hutchinson_z": 2.539,
    "likelihood": {
        "n_points": 256, "dim": 2, "tolerance": 1e-10, "error_rms": 1.311e-10, "hutchinson_dim": 16, "hutchinson_probes": 8,
        "n_hutchinson_points": 128, "hutchinson_standard_error": 0.67, "hutchinson_z_rms": 1.012, "hutchinson_z_mean": 0.00064,
    },
}
DIGITS = {
    "solver": "euler",
    "nfe": 64,
    "fid": 3.21,
    "fid_floor": 1.07,
    "fid_floor_std": 0.05,
    "entropy": 2.25,
    "entropy_max": 2.302585,
    "entropy_heldout": 2.29,
    "memorisation": 1.02,
    "memorisation_reference": 1.0,
    "memorisation_reference_std": 0.01,
    "accuracy": 0.98,
}


def make_inputs(root: Path) -> Path:
    """Lay out params.yaml and a small set of stage outputs under ``root``; return its reports dir."""
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    reports = root / "reports"
    for name in ("cat_denoise_example.png", "noise_sequence.png", "plot_denoise_arrow.png", "plot_stepwise_path.png"):
        write_png(reports / "figures" / name)
    write_gif(reports / "figures" / "interpolation.gif")
    write_png(reports / "figures" / "single_point" / "convergence.png")
    write_png(reports / "figures" / "single_point" / "extra_view.png")
    write_png(reports / "figures" / "gaussian" / "velocity_error.png")
    write_png(reports / "figures" / "moons" / "samples.png")
    write_png(reports / "figures" / "moons" / "quality_vs_nfe.png")
    write_png(reports / "figures" / "moons" / "straightness.png")

    write_json(reports / "metrics" / "single_point.json", SINGLE_POINT)
    write_json(reports / "metrics" / "moons.json", MOONS)
    write_json(reports / "metrics" / "checkerboard.json", CHECKERBOARD)
    write_json(reports / "metrics" / "digits.json", DIGITS)
    write_json(reports / "metrics" / "classifier.json", {"accuracy": 0.9822, "n_test": 450})
    write_json(reports / "metrics" / "gaussian.json", GAUSSIAN)
    write_json(reports / "metrics" / "surprise.json", {"brand_new_metric": 42.5})
    write_json(reports / "timing" / "train_moons.json", {"seconds": 12.5, "steps_per_second": 480.0})

    plots = reports / "plots" / "moons"
    plots.mkdir(parents=True)
    (plots / "quality_vs_nfe.csv").write_text("solver,nfe_budget,nfe,w2,energy\neuler,4,4,0.31,0.05\neuler,16,16,0.12,0.01\nrk4,4,4,0.09,0.003\nrk4,16,16,0.0813,\n")
    learned = reports / "plots" / "gaussian" / "learned_flow"
    learned.mkdir(parents=True)
    (learned / "velocity_error.csv").write_text("t,velocity_error\n0.02,0.0213\n0.5,0.0031\n0.98,0.0042\n")

    loss = reports / "train" / "moons" / "plots" / "metrics" / "train"
    loss.mkdir(parents=True)
    (loss / "loss.tsv").write_text("timestamp\tstep\tloss\n1700000000000\t0\t2.0\n1700000000500\t1\t1.5\n1700000001000\t2\t1.25\n")
    return reports


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """Inputs in a fresh directory, for tests that change them; the report is not built yet."""
    reports = make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return reports


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The reports directory after one run of the stage on the shared inputs (read only)."""
    root = tmp_path_factory.mktemp("report")
    reports = make_inputs(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        report.main()
    return reports


@pytest.fixture(scope="module")
def built_full(tmp_path_factory) -> str:
    """The markdown of a run with the marginal-flow metrics and figures present as well (read only)."""
    root = tmp_path_factory.mktemp("report_full")
    reports = make_inputs(root)
    write_json(reports / "metrics" / "marginal_flow.json", MARGINAL_FLOW)
    for name in ("landing.png", "solver_convergence.png", "likelihood.png", "gaussian_flow.png"):
        write_png(reports / "figures" / "marginal" / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        report.main()
    return (reports / "report.md").read_text()


def section(text: str, title: str) -> str:
    """The markdown of the level-2 section ``title``, up to the next level-2 heading."""
    return text.split(f"\n## {title}\n")[1].split("\n## ")[0]


def before_environment(text: str) -> str:
    """The markdown before the environment section, the only part that may vary between runs."""
    return text.split(f"## {report.ENVIRONMENT_TITLE}")[0]


def html_before_environment(page: str) -> str:
    return page.split('<h2 id="environment">')[0]


def test_main_writes_markdown_and_html(built):
    assert (built / "report.md").is_file()
    assert (built / "report.html").is_file()


def test_numbers_come_from_metrics(built):
    text = (built / "report.md").read_text()

    assert "0.0812" in text
    assert "0.0401" in text
    assert "0.0032" in text
    assert "3.98" in text
    assert "0.00456" in text


def test_floor_sentences(built):
    text = (built / "report.md").read_text()

    assert "w2 = 0.0812 for the best sample set at the largest NFE budget (solver `rk4`, nfe = 16)" in text
    assert "w2_floor = 0.0401 (standard deviation 0.0032 over seeds), so the model is at 2.025 times the floor." in text
    assert "fid = 3.21 for the best sample set" in text


def test_floor_sentence_for_fd_pca():
    # Image data sets scored without a classifier report fd_pca beside its floor.
    metrics = {"fd_pca": 12.0, "fd_pca_floor": 4.0, "fd_pca_floor_std": 0.5, "solver": "euler", "nfe": 8}

    sentences = report_tables.floor_sentences(metrics)

    assert len(sentences) == 1
    assert sentences[0].startswith("fd_pca = 12 for the best sample set at the largest NFE budget")
    assert sentences[0].endswith("so the model is at 3 times the floor.")


def test_image_sentences(built):
    text = (built / "report.md").read_text()

    assert "entropy 2.25 (uniform classes 2.303, held-out images 2.29)" in text
    assert "is 1.02, against 1 ± 0.01 for held-out images" in text


def test_distance_table_beside_floors(built):
    text = (built / "report.md").read_text()

    assert "| data set | solver | nfe | w2 (floor ± std) | energy (floor ± std) | straightness | nll |" in text
    assert "| moons | rk4 | 16 | 0.0812 (0.0401 ± 0.0032) | 0.0021 | 0.0543 | 1.234 |" in text
    assert "| data set | solver | nfe | fid (floor ± std) | entropy | memorisation |" in text
    assert "| digits | euler | 64 | 3.21 (1.07 ± 0.05) | 2.25 | 1.02 |" in text


def test_straightness_sentence(built):
    results = section((built / "report.md").read_text(), report.RESULTS_TITLE)

    assert "moons (straightness 0.0543): w2 = 0.31 at 4 NFE, 3.818 times its large-budget value" in results
    assert "checkerboard (straightness 0.21): w2 = 0.5 at 4 NFE, 5 times its large-budget value" in results
    assert "Among the data sets scored by w2, ordered by straightness, the low-NFE ratios rise too" in results


def test_straightness_sentence_not_monotone():
    metrics = {
        "a": {"w2": 0.1, "straightness": 0.1, "by_solver": {"euler": {"nfe4": {"nfe": 4, "w2": 0.5}}}},
        "b": {"w2": 0.1, "straightness": 0.3, "by_solver": {"euler": {"nfe4": {"nfe": 4, "w2": 0.2}}}},
    }

    assert "do not rise monotonically" in report_tables.straightness_sentence(metrics)


def test_straightness_sentence_groups_by_distance():
    metrics = {
        "a": {"w2": 0.1, "straightness": 0.1, "by_solver": {"euler": {"nfe4": {"nfe": 4, "w2": 0.5}}}},
        "b": {"fid": 10.0, "straightness": 9.0, "by_solver": {"euler": {"nfe4": {"nfe": 4, "fid": 12.0}}}},
    }
    sentence = report_tables.straightness_sentence(metrics)

    assert "Among the data sets" not in sentence
    assert "data sets scored by different distances are not compared" in sentence


def test_straightness_sentence_needs_euler():
    metrics = {"a": {"w2": 0.1, "straightness": 0.1, "by_solver": {"rk4": {"nfe4": {"nfe": 4, "w2": 0.5}}}}}

    assert report_tables.straightness_sentence(metrics) is None


def test_by_solver_pivot(built):
    text = (built / "report.md").read_text()

    assert "`w2` per solver and NFE budget:" in text
    assert "| solver | nfe 4 | nfe 16 |" in text
    assert "| dopri5 |  | 0.0851 (14) |" in text
    assert "| euler | 0.31 | 0.12 |" in text
    assert "| rk4 | 0.09 | 0.0813 |" in text
    assert "| rk4 | 0.003 | null |" in text
    assert "A number in brackets is the NFE the run actually used" in text


def test_classifier_under_digits(built):
    text = (built / "report.md").read_text()

    assert text.index("### digits") < text.index("reports/metrics/classifier.json") < text.index("## Parameters")


def test_new_metric_appears(built):
    text = (built / "report.md").read_text()

    assert "`brand_new_metric`" in text
    assert "42.5" in text


def test_nested_metrics_become_table_rows(built):
    appendix = section((built / "report.md").read_text(), report.APPENDIX_TITLE)

    assert "| endpoint_error | steps_2 | steps_16 | tol_1e-03 |" in appendix
    assert "| euler | 0.62 | 0.0097 |  |" in appendix
    assert "| dopri5 |  |  | 1.1e-08 |" in appendix
    assert re.search(r"\| `order` \| 1\.01 \| 3\.98 \|", appendix)
    assert "by_solver" not in appendix


def test_single_point_claim(built):
    claim = section((built / "report.md").read_text(), report.CLAIM_TITLES[0])

    assert "at most 1.546 standard errors from alpha_t z (RMS 0.7549)" in claim
    assert "at most 2.392 standard errors from beta_t^2 I (RMS 1.293): consistent with sampling noise alone." in claim
    assert "| solver | 2 steps | 16 steps |" in claim
    assert "| rk4 | 0.23 | 1.5e-07 |" in claim
    assert "| 1e-03 | 1.1e-08 | 1022 |" in claim
    assert "Fitted orders (minus the slope of log error against log steps): euler 1.01, rk4 3.98." in claim
    assert "The singular x form at t = 1." in claim


def test_marginal_claim(built_full):
    claim = section(built_full, report.CLAIM_TITLES[1])

    assert "puts 99.8% of its samples within 0.01 of a training point" in claim
    assert "against 4.5% of fresh test points (median distance 0.0429)" in claim
    assert "is 0.003163 in 1-D and 0.006252 in 2-D, and it falls with order 1.992 (1-D) and 1.921 (2-D)" in claim
    assert "The standardised errors have RMS 1.059 (1 expected)" in claim
    assert "falls like m^-0.4868" in claim
    assert "landing.png)" in claim


def test_gaussian_claim(built_full):
    claim = section(built_full, report.CLAIM_TITLES[2])

    assert "mean is within 0.4262 and whose covariance is within 0.4833 standard errors" in claim
    assert "differs from the closed form by 0.00456 on average over t" in claim
    assert "at most 0.0213. It is largest at t = 0.02 (0.0213) and smallest at t = 0.5 (0.0031)." in claim
    assert "held-out negative log-likelihood of 2.501 nats per sample, 0.0025 nats above the 2.499 of the true N(mean, cov)" in claim
    assert "figures/gaussian/velocity_error.png)" in claim
    assert "figures/marginal/gaussian_flow.png)" in claim


def test_likelihood_claim(built_full):
    claim = section(built_full, report.CLAIM_TITLES[3])

    assert "is within 6.59e-10 nats of log N(x; mean, cov) (RMS 1.311e-10)" in claim
    assert "off by at most 2.539 standard errors, with mean 0.00064" in claim
    assert "RMS 1.012 (1 expected)" in claim
    assert "| data set | nll | nll_per_dim | nll_true | nll_t_end |" in claim
    assert "| moons | 1.234 | 0.617 |  | 1 |" in claim
    assert "| gaussian | 2.501 |  | 2.499 |  |" in claim


def test_solver_orders_stated(built_full):
    solvers = section(built_full, report.SOLVER_SECTION_TITLE)

    assert "under the reference schedule `cosine`, euler 0.9841, midpoint 2.054, heun 1.966, rk4 4.082" in solvers
    assert "under the study's schedule `linear`, euler 0.9872, midpoint 2.997, heun 1.95, rk4 4.296" in solvers
    assert "midpoint converges with order 3 here" in solvers
    assert "The single-point flow measures other orders (euler 1.01, rk4 3.98)" in solvers
    assert "solver_convergence.png)" in solvers


def test_solver_orders_same_schedule(workspace):
    metrics = dict(MARGINAL_FLOW, solver_order_study=MARGINAL_FLOW["solver_order"], solver_order_schedules={"reference": "cosine", "study": "cosine"})
    write_json(workspace / "metrics" / "marginal_flow.json", metrics)

    report.main()
    solvers = section((workspace / "report.md").read_text(), report.SOLVER_SECTION_TITLE)

    assert "rk4 4.082, which is also the study's schedule." in solvers
    assert "Every order is within 0.3 of its textbook value." in solvers


def test_claims_without_metrics_say_so(built):
    text = (built / "report.md").read_text()

    for title in report.CLAIM_TITLES[1:] + (report.SOLVER_SECTION_TITLE,):
        assert "`reports/metrics/marginal_flow.json` is missing (the `marginal_flow` stage writes it)" in section(text, title), title


def test_missing_metric_key_gets_sentence(workspace):
    write_json(workspace / "metrics" / "gaussian.json", {"w2": 0.02, "w2_floor": 0.018})

    report.main()
    claim = section((workspace / "report.md").read_text(), report.CLAIM_TITLES[2])

    assert "`reports/metrics/gaussian.json` has no `velocity_error`, `velocity_error_max` (rerun the `evaluate` stage)." in claim
    assert "`reports/metrics/gaussian.json` has no `nll`, `nll_true` (rerun the `evaluate` stage)." in claim


def test_known_figures_get_captions(built):
    text = (built / "report.md").read_text()

    assert f"*{report_figures.FIGURE_CAPTIONS['single_point/convergence.png']}*" in text
    assert "*Samples of the trained model of moons with the best solver" in text
    assert "*moons: E |v(x_t, t) - (x_1 - x_0)|^2 along trajectories of the learned flow" in text
    assert "Figure `convergence.png`" not in text


def test_unknown_figure_gets_generic_caption(built):
    text = (built / "report.md").read_text()

    assert "*Figure `extra_view.png` of `reports/figures/single_point`.*" in text


def test_report_draws_quality_instead_of_evaluate_figure(built):
    text = (built / "report.md").read_text()

    assert "figures/report/moons_quality_vs_nfe.png)" in text
    assert "figures/moons/quality_vs_nfe.png)" not in text


def test_sections_in_reading_order(built):
    text = (built / "report.md").read_text()
    titles = ["Schedule", "Denoising intuition", *report.CLAIM_TITLES[:2], "Training", *report.CLAIM_TITLES[2:], report.SOLVER_SECTION_TITLE, report.RESULTS_TITLE, "Parameters", report.APPENDIX_TITLE, report.ENVIRONMENT_TITLE]
    positions = [text.index(f"\n## {title}\n") for title in titles]

    assert positions == sorted(positions)


def test_dvc_report_deps_list_modules():
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]["deps"]

    for module in sorted((REPO / "stages").glob("report*.py")):
        assert f"stages/{module.name}" in deps, module.name


def test_figure_links_exist(built):
    text = (built / "report.md").read_text()
    targets = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)

    assert len(targets) >= 8
    for target in targets:
        assert (built / target).is_file(), target


def test_missing_figure_gets_sentence(built):
    text = (built / "report.md").read_text()

    assert "`reports/figures/which_way.gif` does not exist (the `noise_sequence` stage writes it)" in text
    assert "which_way.gif)" not in text


def test_missing_metrics_get_sentence(built):
    text = (built / "report.md").read_text()

    assert "`reports/metrics/marginal_flow.json` is missing (the `marginal_flow` stage writes it)" in text


def test_oversized_figure_left_out(workspace):
    big = workspace / "figures" / "plot_smooth_trajectory.png"
    big.write_bytes(b"\0" * report_render.MAX_FIGURE_BYTES)

    report.main()
    text = (workspace / "report.md").read_text()

    assert "plot_smooth_trajectory.png)" not in text
    assert "over the 2 MiB limit" in text


def test_own_figures_drawn(built):
    assert (built / "figures" / "report" / "loss_curves.png").is_file()
    assert (built / "figures" / "report" / "moons_quality_vs_nfe.png").is_file()


def test_own_figures_under_limit(built):
    for path in (built / "figures" / "report").iterdir():
        assert path.stat().st_size < report_render.MAX_FIGURE_BYTES, path
        assert Image.open(path).size[0] >= 600, path


def test_loss_curve_last_value_listed(built):
    text = (built / "report.md").read_text()

    assert "| moons | `train/loss` | 2 | 1.25 |" in text


def test_schedule_and_vp_gap_named(built):
    text = (built / "report.md").read_text()
    gap = report.get_schedule("vp", beta_min=0.1, beta_max=20.0).alpha_0_gap

    assert "schedule `cosine`" in text
    assert f"= {gap:.4g} instead of 0" in text


def test_timings_only_in_environment(built):
    text = (built / "report.md").read_text()

    assert "steps_per_second" not in before_environment(text)
    assert "steps_per_second" in text


def test_identical_inputs_identical_bytes(workspace):
    report.main()
    first_md = (workspace / "report.md").read_text()
    first_html = (workspace / "report.html").read_text()
    first_figures = {p.name: p.read_bytes() for p in (workspace / "figures" / "report").iterdir()}

    report.main()

    assert before_environment((workspace / "report.md").read_text()) == before_environment(first_md)
    assert html_before_environment((workspace / "report.html").read_text()) == html_before_environment(first_html)
    assert '<h2 id="environment">' in first_html
    assert {p.name: p.read_bytes() for p in (workspace / "figures" / "report").iterdir()} == first_figures


def test_html_embeds_every_figure(built):
    page = (built / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)

    assert len(sources) == len(re.findall(r"!\[", (built / "report.md").read_text()))
    assert all(source.startswith("data:image/") for source in sources)
    assert any(source.startswith("data:image/gif;base64,") for source in sources)


def test_html_gif_round_trips(built):
    page = (built / "report.html").read_text()
    encoded = re.search(r'src="data:image/gif;base64,([^"]+)"', page).group(1)

    data = base64.b64decode(encoded)
    assert data == (built / "figures" / "interpolation.gif").read_bytes()
    assert Image.open(io.BytesIO(data)).n_frames == 3


def test_html_anchors_resolve(built):
    page = (built / "report.html").read_text()
    ids = set(re.findall(r' id="([^"]+)"', page))
    anchors = re.findall(r'href="#([^"]+)"', page)

    assert anchors
    for anchor in anchors:
        assert anchor in ids, anchor


def test_stale_own_figure_removed(workspace):
    stale = workspace / "figures" / "report" / "old_dataset_quality_vs_nfe.png"
    write_png(stale)

    report.main()

    assert not stale.exists()


def test_invalid_metrics_json_names_file(workspace):
    (workspace / "metrics" / "moons.json").write_text("{not json")

    with pytest.raises(report.StageError, match="moons.json"):
        report.main()


def test_invalid_param_stops_before_output(workspace):
    params = Path("params.yaml")
    params.write_text(params.read_text().replace("schedule: cosine", "schedule: sigmoid"))

    with pytest.raises(report.StageError, match="schedule"):
        report.main()
    assert not (workspace / "report.md").exists()
