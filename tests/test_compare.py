"""The experiment comparison (tools/compare.py) on captured `dvc exp show --json` output.

tests/fixtures/dvc_exp_show.json is real DVC 3.67 output: a one-stage project writing
reports/metrics/moons.json, committed with schedule=linear, then `dvc exp run -S
schedule=cosine` and `dvc exp run -S train.lr=0.004`. ``failed_run`` turns one of its
experiments into what DVC 3.67.1 shows for a queued run that failed: the queued
parameters, the baseline's metrics, ``executor.state`` "failed" and the error
{"msg": "Experiment run failed", "type": ""}.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline_utils import DVC, environment, init_git, run

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


def failed_run(shown: list, state: str | None = "failed", error: dict | None = None) -> list:
    """Return ``shown`` with scaly-gaze made a queued run of schedule=nonsense in ``state``, with master's metrics."""
    edited = copy.deepcopy(shown)
    experiment = edited[1]["experiments"][0]
    rev = experiment["revs"][0]
    rev["data"]["params"] = copy.deepcopy(edited[1]["data"]["params"])
    rev["data"]["params"]["params.yaml"]["data"]["schedule"] = "nonsense"
    rev["data"]["metrics"] = copy.deepcopy(edited[1]["data"]["metrics"])
    rev["error"] = error
    if state is not None:
        experiment["executor"] = {"state": state, "name": None, "local": {"root": None, "log": "/tmp/run.out", "pid": 1, "returncode": 255, "task_id": rev["rev"]}}
    return edited


def render(rows: list) -> str:
    return compare.build_markdown(rows, None, [], Path("reports/comparison.md"))


def test_failed_experiment_left_out(shown):
    rows = compare.parse_exp_show(failed_run(shown, error={"msg": "Experiment run failed", "type": ""}))
    failed = next(row for row in rows if row.name == "scaly-gaze")
    text = render(rows)

    assert failed.state == "failed"
    assert failed.changed_params == ["schedule=nonsense"]
    assert "## Failed experiments" in text
    assert "- scaly-gaze (experiment, 6812f10): schedule=nonsense" in text
    assert text.count("scaly-gaze") == 1
    assert "could not read" not in text


def test_failed_experiment_without_executor(shown):
    """An error beside the data marks a failed run even where DVC gives no executor."""
    rows = compare.parse_exp_show(failed_run(shown, state=None, error={"msg": "Experiment run failed", "type": ""}))

    assert next(row for row in rows if row.name == "scaly-gaze").state == "failed"


def test_queued_experiment_listed_not_finished(shown):
    rows = compare.parse_exp_show(failed_run(shown, state="queued"))
    text = render(rows)

    assert next(row for row in rows if row.name == "scaly-gaze").state == "queued"
    assert "- scaly-gaze (experiment, 6812f10), queued: schedule=nonsense" in text
    assert text.count("scaly-gaze") == 1


def test_failed_experiment_left_out_of_figure(shown, tmp_path, monkeypatch):
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(failed_run(shown, error={"msg": "Experiment run failed", "type": ""})))
    plotted = []
    plot = compare.plot_comparison

    def record_rows(root, rows, out, solver):
        plotted.extend(row.name for row in rows)
        return plot(root, rows, out, solver)

    monkeypatch.setattr(compare, "plot_comparison", record_rows)

    assert compare.main(["--input", str(saved), "--root", str(tmp_path)]) == 0
    assert "scaly-gaze" not in plotted
    assert "master" in plotted


def test_unreadable_revision_listed(shown):
    edited = copy.deepcopy(shown)
    edited[1]["experiments"][0]["revs"][0]["data"] = None
    edited[1]["experiments"][0]["revs"][0]["error"] = {"type": "FileNotFoundError", "msg": "params.yaml not found"}

    rows = compare.parse_exp_show(edited)
    unreadable = next(row for row in rows if row.name == "scaly-gaze")
    text = render(rows)

    assert unreadable.state == "unreadable"
    assert "- scaly-gaze (experiment, 6812f10): params.yaml not found" in text
    assert text.count("scaly-gaze") == 1


def stale_workspace(shown: list) -> list:
    """Return ``shown`` with the workspace after a failed `dvc exp run -S train.device=tpu`: new params, master's metrics."""
    edited = copy.deepcopy(shown)
    edited[0]["data"]["params"] = copy.deepcopy(edited[1]["data"]["params"])
    edited[0]["data"]["params"]["params.yaml"]["data"]["train"]["device"] = "tpu"
    edited[0]["data"]["metrics"] = copy.deepcopy(edited[1]["data"]["metrics"])
    return edited


def test_workspace_outdated_by_dvc_status(shown):
    rows = compare.parse_exp_show(stale_workspace(shown), outdated_stages=["train@moons"])
    text = render(rows)

    assert rows[0].kind == "workspace"
    assert rows[0].state == "outdated"
    assert "The workspace (train.device=tpu) is left out: `dvc status` reports stages whose outputs are not up to date (train@moons)." in text
    assert "Run `dvc repro`" in text
    assert "| workspace |" not in text


def test_workspace_outdated_by_unchanged_metrics(shown):
    """Without dvc status (a saved output), metrics equal to another row's mark the workspace outdated."""
    rows = compare.parse_exp_show(stale_workspace(shown))

    assert rows[0].state == "outdated"
    assert rows[0].error == "its metrics files are those of master (baseline, 96fbe11), so they were not recomputed for its parameters"


def test_workspace_kept_when_dvc_status_clean(shown):
    rows = compare.parse_exp_show(stale_workspace(shown), outdated_stages=[])

    assert rows[0].kind == "workspace"
    assert rows[0].state == "success"
    assert "| workspace | linear | 0.002 | tpu |" in render(rows)


STAGE = """import json
import sys

import yaml

params = yaml.safe_load(open("params.yaml"))
if params["device"] not in ("cpu", "cuda"):
    sys.exit(f"error: invalid device {params['device']!r}")
json.dump({"w2": 0.1 * params["scale"]}, open("metrics.json", "w"))
"""

PIPELINE = """stages:
  compute:
    cmd: python stage.py
    deps: [stage.py]
    params: [device, scale]
    metrics:
      - metrics.json:
          cache: false
"""


def test_main_skips_workspace_after_failed_run(tmp_path):
    """A real `dvc exp run -S device=tpu` that fails leaves params.yaml changed and metrics.json old."""
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(PIPELINE)
    (tmp_path / "params.yaml").write_text("device: cpu\nscale: 1\n")
    run(["git", "init", "-q"], tmp_path)
    run([DVC, "init", "-q"], tmp_path)
    run([DVC, "config", "core.check_update", "false"], tmp_path)
    run([DVC, "repro", "-q"], tmp_path)
    init_git(tmp_path)
    failed = subprocess.run([DVC, "exp", "run", "-S", "device=tpu"], cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)

    stages = compare.run_dvc_status(tmp_path)
    code = compare.main(["--root", str(tmp_path)])
    text = (tmp_path / "reports" / "comparison.md").read_text()

    assert failed.returncode != 0
    assert stages == ["compute"]
    assert code == 0
    assert "The workspace (device=tpu) is left out: `dvc status` reports stages whose outputs are not up to date (compute)." in text
    assert "| workspace |" not in text


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


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty, expected the output of `dvc exp show --json`"),
        (b"  \n", "the file is empty, expected the output of `dvc exp show --json`"),
        (b"exp show failed", "not valid JSON (Expecting value at line 1, column 1)"),
        (b'[{"rev": "abc",', "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 16)"),
        (b"\xff\xfe[]", "not UTF-8 text (invalid byte 0xff at offset 0)"),
        (b'[{"rev": 5, "data": [1]}]', "not the layout of `dvc exp show --json`: [0].rev is 5, expected a string"),
        (b'[{"rev": "abc", "data": [1]}]', "not the layout of `dvc exp show --json`: [0].data is [1], expected an object or null"),
        (b'{"rev": "workspace"}', "not the layout of `dvc exp show --json`: expected a list of commits, found dict"),
    ],
)
def test_main_input_error_one_line(tmp_path, capsys, content, message):
    saved = tmp_path / "exp_show.json"
    saved.write_bytes(content)

    code = compare.main(["--input", str(saved), "--root", str(tmp_path)])
    error = capsys.readouterr().err

    assert code == 2
    assert error == f"error: {saved}: {message}\n"


def test_main_missing_input_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"

    code = compare.main(["--input", str(missing), "--root", str(tmp_path)])

    assert code == 2
    assert capsys.readouterr().err == f"error: {missing}: cannot read the file (No such file or directory)\n"


def json_paths(value: object, path: tuple = ()) -> list[tuple]:
    """Return the path of every node under ``value``, ``value`` itself excluded."""
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        children = []
    paths = []
    for key, child in children:
        paths += [(*path, key), *json_paths(child, (*path, key))]
    return paths


def test_misplaced_value_raises_compare_error(shown):
    """Every node of the fixture replaced by each JSON type: parsing raises CompareError or the report builds."""
    for path in json_paths(shown):
        for replacement in (5, "x", None, True, [1], {}, {"data": 1}):
            edited = copy.deepcopy(shown)
            parent = edited
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = replacement
            try:
                rows = compare.parse_exp_show(edited)
            except compare.CompareError:
                continue
            render(rows)
            for row in rows:
                for metrics in row.metrics.values():
                    compare.curves_from_metrics(metrics)


@pytest.mark.parametrize(("commits", "counted"), [(slice(1, 2), "compared 3 rows;"), (slice(0, 0), "compared 1 row;")])
def test_main_log_counts_rows(shown, tmp_path, caplog, commits, counted):
    single = [dict(shown[1], experiments=None)]
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(shown[commits] or single))
    caplog.set_level(logging.INFO, logger="flowmatch.compare")

    assert compare.main(["--input", str(saved), "--root", str(tmp_path)]) == 0
    assert counted in caplog.text


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
