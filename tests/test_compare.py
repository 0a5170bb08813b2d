"""The experiment comparison (tools/compare.py) on captured `dvc exp show --json` output.

tests/fixtures/dvc_exp_show.json is real DVC 3.67 output: a one-stage project writing
reports/metrics/moons.json, committed with schedule=linear, then `dvc exp run -S
schedule=cosine` and `dvc exp run -S train.lr=0.004`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "dvc_exp_show.json"

spec = importlib.util.spec_from_file_location("tools_compare", REPO / "tools" / "compare.py")
compare = importlib.util.module_from_spec(spec)
sys.modules["tools_compare"] = compare  # dataclasses look the module up by name
spec.loader.exec_module(compare)


@pytest.fixture
def shown() -> list:
    return json.loads(FIXTURE.read_text())


def git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd=root, check=True, capture_output=True, text=True)
    return result.stdout.strip()


def test_parse_lists_baseline_and_experiments(shown):
    rows = compare.parse_exp_show(shown)

    assert [row.name for row in rows] == ["master", "scaly-gaze", "itchy-heir"]
    assert [row.kind for row in rows] == ["baseline", "experiment", "experiment"]


def test_parse_reads_params_and_metrics(shown):
    row = compare.parse_exp_show(shown)[2]

    assert row.params["schedule"] == "cosine"
    assert row.params["train.lr"] == 0.002
    assert row.metrics["reports/metrics/moons.json"]["w2"] == 0.1326


def test_workspace_copy_of_experiment_dropped(shown):
    rows = compare.parse_exp_show(shown)

    assert "workspace" not in [row.kind for row in rows]


def test_workspace_kept_when_different(shown):
    edited = copy.deepcopy(shown)
    edited[0]["data"]["params"]["params.yaml"]["data"]["train"]["steps"] = 500

    rows = compare.parse_exp_show(edited)

    assert rows[0].kind == "workspace"
    assert rows[0].params["train.steps"] == 500


def test_differing_params(shown):
    rows = compare.parse_exp_show(shown)

    assert compare.differing_params(rows) == ["schedule", "train.lr"]


def test_failed_experiment_reported(shown):
    edited = copy.deepcopy(shown)
    edited[1]["experiments"][0]["revs"][0]["data"] = None
    edited[1]["experiments"][0]["revs"][0]["error"] = {"type": "ReproductionError", "msg": "failed to reproduce 'evaluate'"}

    rows = compare.parse_exp_show(edited)
    failed = next(row for row in rows if row.name == "scaly-gaze")
    text = compare.build_markdown(rows, None, [], Path("reports/comparison.md"))

    assert failed.metrics == {}
    assert "failed to reproduce 'evaluate'" in text


def test_not_a_list_rejected():
    with pytest.raises(compare.CompareError, match="expected a list"):
        compare.parse_exp_show({"rev": "workspace"})


def test_curves_from_nested_solver_keys(shown):
    metrics = compare.parse_exp_show(shown)[0].metrics["reports/metrics/moons.json"]

    curves = compare.curves_from_metrics(metrics)

    assert curves[("rk4", "w2")] == {4: 0.1275, 16: 0.108375}
    assert curves[("euler", "w2")] == {4: 0.204, 16: 0.1275}


def test_curves_from_joined_keys_and_records():
    joined = {"by_solver": {"rk4_nfe8": {"w2": 0.2}, "euler_nfe8": {"w2": 0.5}}}
    records = {"by_solver": [{"solver": "rk4", "nfe": 8, "w2": 0.2}]}

    assert compare.curves_from_metrics(joined)[("rk4", "w2")] == {8: 0.2}
    assert compare.curves_from_metrics(records)[("rk4", "w2")] == {8: 0.2}


def test_curves_skip_inner_nfe_count():
    metrics = {"by_solver": {"dopri5": {"nfe8": {"nfe": 14, "w2": 0.2}}}}

    assert compare.curves_from_metrics(metrics) == {("dopri5", "w2"): {8: 0.2}}


def test_curves_ignore_top_level_metrics():
    assert compare.curves_from_metrics({"w2": 0.1, "nll": 1.0}) == {}


def test_main_writes_table_and_figure(tmp_path):
    code = compare.main(["--input", str(FIXTURE), "--root", str(tmp_path)])
    text = (tmp_path / "reports" / "comparison.md").read_text()
    figure = tmp_path / "reports" / "figures" / "comparison_quality_vs_nfe.png"

    assert code == 0
    assert "| itchy-heir (experiment, 2ecd8e2) | cosine | 0.002 |" in text
    assert "| master (baseline, 96fbe11) | 0.102 | 0.05 | 1.224 |" in text
    assert "](figures/comparison_quality_vs_nfe.png)" in text
    assert Image.open(figure).size[0] >= 600
    assert figure.stat().st_size < 2 * 1024 * 1024


def test_main_invalid_input_exit_code(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")

    assert compare.main(["--input", str(bad), "--root", str(tmp_path)]) == 2


def test_curves_from_plot_csv_at_experiment_rev(tmp_path):
    """Without per-NFE metrics the curves come from each experiment's committed plot CSV."""
    git(tmp_path, "init", "-q")
    plots = tmp_path / "reports" / "plots" / "moons"
    plots.mkdir(parents=True)
    revs = []
    for scale in (1.0, 2.0):
        (plots / "quality.csv").write_text(f"solver,nfe,w2\nrk4,4,{0.4 * scale}\nrk4,8,{0.2 * scale}\neuler,4,0.9\n")
        git(tmp_path, "add", "-A")
        git(tmp_path, "commit", "-qm", f"scale {scale}")
        revs.append(git(tmp_path, "rev-parse", "HEAD"))
    rows = [compare.Experiment(name=f"exp{i}", rev=rev, params={}, metrics={"reports/metrics/moons.json": {"w2": 0.1}}, kind="experiment") for i, rev in enumerate(revs)]

    first = compare.experiment_curves(tmp_path, rows[0], "moons", "reports/metrics/moons.json")
    panels = compare.plot_comparison(tmp_path, rows, tmp_path / "figure.png", None)

    assert first[("rk4", "w2")] == {4: 0.4, 8: 0.2}
    assert panels == ["moons: w2 with rk4"]
    assert (tmp_path / "figure.png").is_file()
