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

from stages import report

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
    "straightness": 0.987,
    "by_solver": {
        "euler": {"nfe4": {"nfe": 4, "w2": 0.31, "energy": 0.05}, "nfe16": {"nfe": 16, "w2": 0.12, "energy": 0.01}},
        "rk4": {"nfe4": {"nfe": 4, "w2": 0.09, "energy": 0.003}, "nfe16": {"nfe": 16, "w2": 0.0813, "energy": None}},
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

    write_json(reports / "metrics" / "single_point.json", {"order": {"euler": 1.01, "rk4": 3.98}, "endpoint_error": {"euler": 0.02, "rk4": 1.5e-7}, "max_mean_error": 0.0123})
    write_json(reports / "metrics" / "moons.json", MOONS)
    write_json(reports / "metrics" / "digits.json", DIGITS)
    write_json(reports / "metrics" / "classifier.json", {"accuracy": 0.9822, "n_test": 450})
    write_json(reports / "metrics" / "gaussian.json", {"velocity_error": 0.00456, "w2": 0.02, "w2_floor": 0.018})
    write_json(reports / "metrics" / "surprise.json", {"brand_new_metric": 42.5})
    write_json(reports / "timing" / "train_moons.json", {"seconds": 12.5, "steps_per_second": 480.0})

    plots = reports / "plots" / "moons"
    plots.mkdir(parents=True)
    (plots / "quality_vs_nfe.csv").write_text("solver,nfe_budget,nfe,w2,energy\neuler,4,4,0.31,0.05\neuler,16,16,0.12,0.01\nrk4,4,4,0.09,0.003\nrk4,16,16,0.0813,\n")

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


def test_image_sentences(built):
    text = (built / "report.md").read_text()

    assert "entropy 2.25 (uniform classes 2.303, held-out images 2.29)" in text
    assert "is 1.02, against 1 ± 0.01 for held-out images" in text


def test_summary_table_across_datasets(built):
    text = (built / "report.md").read_text()

    assert "| data set | solver | nfe | w2 | w2_floor | w2_floor_std | energy | nll | straightness |" in text
    assert "| moons | rk4 | 16 | 0.0812 | 0.0401 | 0.0032 | 0.0021 | 1.234 | 0.987 |" in text
    assert "| data set | solver | nfe | fid | fid_floor | entropy | memorisation | accuracy |" in text
    assert "| digits | euler | 64 | 3.21 | 1.07 | 2.25 | 1.02 | 0.98 |" in text


def test_classifier_under_digits(built):
    text = (built / "report.md").read_text()

    assert text.index("### digits") < text.index("reports/metrics/classifier.json") < text.index("## Parameters")


def test_new_metric_appears(built):
    text = (built / "report.md").read_text()

    assert "`brand_new_metric`" in text
    assert "42.5" in text


def test_nested_metrics_become_table_rows(built):
    text = (built / "report.md").read_text()

    assert "| by_solver | energy | nfe | w2 |" in text
    assert "| euler.nfe4 | 0.05 | 4 | 0.31 |" in text
    assert "| rk4.nfe16 | null | 16 | 0.0813 |" in text
    assert text.index("euler.nfe4") < text.index("euler.nfe16")
    assert re.search(r"\| `order` \| 1\.01 \| 3\.98 \|", text)


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
    big.write_bytes(b"\0" * report.MAX_FIGURE_BYTES)

    report.main()
    text = (workspace / "report.md").read_text()

    assert "plot_smooth_trajectory.png)" not in text
    assert "over the 2 MiB limit" in text


def test_own_figures_drawn(built):
    assert (built / "figures" / "report" / "loss_curves.png").is_file()
    assert (built / "figures" / "report" / "moons_quality_vs_nfe.png").is_file()


def test_own_figures_under_limit(built):
    for path in (built / "figures" / "report").iterdir():
        assert path.stat().st_size < report.MAX_FIGURE_BYTES, path
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
