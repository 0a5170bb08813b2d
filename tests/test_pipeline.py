"""The whole DVC pipeline on tiny parameters, in a temporary copy of the repository.

Runs `dvc repro`, checks the outputs, that `dvc status` is clean afterwards, and that
`dvc exp run -S schedule=linear` changes the schedule and the metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline_utils import BIN, clone_built_pipeline, run


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    """A git repository holding the project's tracked files, tiny params and a finished `dvc repro`."""
    return clone_built_pipeline(tmp_path_factory.mktemp("pipeline") / "repo")


@pytest.mark.slow
def test_repro_leaves_status_clean(pipeline_repo):
    status = run([str(BIN / "dvc"), "status"], pipeline_repo).stdout
    assert "up to date" in status or "Nothing to reproduce" in status, status


@pytest.mark.slow
def test_report_references_existing_figures(pipeline_repo):
    report = pipeline_repo / "reports" / "report.md"
    text = report.read_text()
    targets = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)

    assert targets
    for target in targets:
        assert (report.parent / target).is_file(), target


@pytest.mark.slow
def test_metrics_are_strict_json(pipeline_repo):
    paths = sorted((pipeline_repo / "reports").glob("**/*.json"))
    assert paths
    for path in paths:
        json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{path} has {token}"))


@pytest.mark.slow
def test_toy_metrics_have_w2_and_floor(pipeline_repo):
    metrics = json.loads((pipeline_repo / "reports" / "metrics" / "moons.json").read_text())
    assert metrics["w2"] > 0
    assert metrics["w2_floor"] > 0


@pytest.mark.slow
def test_exp_run_linear_changes_metrics(pipeline_repo):
    # Commit the cosine baseline, so that `dvc exp show` has its metrics at HEAD.
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", *identity, "add", "-A"], pipeline_repo)
    run(["git", *identity, "commit", "-qm", "cosine baseline"], pipeline_repo)
    # Only the stages that moons' metrics depend on run (train, sample and evaluate of
    # moons), which keeps the test to a few stages instead of the whole pipeline.
    run([str(BIN / "dvc"), "exp", "run", "-S", "schedule=linear", "--name", "linear", "evaluate@moons"], pipeline_repo)
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], pipeline_repo).stdout)

    experiments = {}
    for commit in shown:
        for experiment in [commit] + [e["revs"][0] for e in commit.get("experiments") or []]:
            data = experiment["data"]
            name = experiment.get("name") or data.get("name") or experiment["rev"]
            experiments[name] = data
    linear = experiments["linear"]
    workspace = next(data for data in experiments.values() if data["params"]["params.yaml"]["data"]["schedule"] == "cosine")

    assert linear["params"]["params.yaml"]["data"]["schedule"] == "linear"
    linear_w2 = linear["metrics"]["reports/metrics/moons.json"]["data"]["w2"]
    cosine_w2 = workspace["metrics"]["reports/metrics/moons.json"]["data"]["w2"]
    assert linear_w2 != cosine_w2
