"""The whole DVC pipeline on tiny parameters, in a temporary copy of the repository.

Runs `dvc repro`, checks the outputs, that `dvc status` is clean afterwards, and that
`dvc exp run -S schedule=linear` changes the schedule and the metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Overrides that shrink every stage to seconds; keys must exist in params.yaml.
TINY = {
    "data": {"n_train": 400, "n_test": 200},
    "noise_sequence": {"size": 48, "steps": 4},
    "single_point": {"n_samples": 400, "steps": [2, 4, 8], "n_trajectories": 8},
    "marginal_flow": {"n_points": 16, "n_samples": 64, "steps": 8},
    "train": {"steps": 30, "batch_size": 64, "hidden": 32, "checkpoint_every": 10, "warmup_steps": 5},
    "sample": {"n_samples": 64, "nfe": [4, 8]},
    "evaluate": {"n_eval": 64, "floor_seeds": 2},
}


def tiny_params(raw: dict, overrides: dict) -> dict:
    for section, values in overrides.items():
        for key, value in values.items():
            assert key in raw[section], f"params.yaml has no {section}.{key}; update TINY"
            raw[section][key] = value
    return raw


def run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    """A git repository holding the project's tracked files, tiny params and a finished `dvc repro`."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        source = REPO / name
        if not source.is_file() or name.startswith(("reports/", "data/")) or name == "dvc.lock":
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)

    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw, TINY), sort_keys=False))

    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "add", "-A"], root)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "tiny"], root)
    run([str(BIN / "dvc"), "repro"], root)
    return root


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
    run([str(BIN / "dvc"), "exp", "run", "-S", "schedule=linear", "--name", "linear"], pipeline_repo)
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
