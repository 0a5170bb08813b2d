"""The metrics regression gate (tools/metrics_check.py) against metrics committed in a temporary git repository."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "metrics_check.py"

spec = importlib.util.spec_from_file_location("tools_metrics_check", SCRIPT)
metrics_check = importlib.util.module_from_spec(spec)
sys.modules["tools_metrics_check"] = metrics_check  # dataclasses look the module up by name
spec.loader.exec_module(metrics_check)

MOONS = {
    "w2": 0.08,
    "w2_floor": 0.04,
    "nll": 1.2,
    "straightness": 0.25,
    "by_solver": {"rk4": {"nfe16": {"w2": 0.081}}},
}
CLASSIFIER = {"accuracy": 0.98, "n_test": 450}


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd=root, check=True, capture_output=True)


def write_metrics(root: Path, name: str, data: dict, folder: str = "reports/metrics") -> None:
    path = root / folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository whose HEAD commits two metrics files, one timing file and the project's tolerances."""
    git(tmp_path, "init", "-q")
    shutil.copy(REPO / "metrics_tolerances.yaml", tmp_path / "metrics_tolerances.yaml")
    write_metrics(tmp_path, "moons", MOONS)
    write_metrics(tmp_path, "classifier", CLASSIFIER)
    write_metrics(tmp_path, "train_moons", {"seconds": 10.0}, folder="reports/timing")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "baseline")
    return tmp_path


def check(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=root, capture_output=True, text=True)


def test_unchanged_passes(repo):
    result = check(repo)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 worse beyond tolerance" in result.stdout


def test_degraded_w2_fails_and_names_it(repo):
    write_metrics(repo, "moons", {**MOONS, "w2": 0.12})

    result = check(repo)

    assert result.returncode == 1
    assert "moons.w2 " in result.stdout
    assert "+50.00%" in result.stdout
    assert "reports/metrics/moons.json" in result.stdout


def test_degraded_nested_metric_named(repo):
    write_metrics(repo, "moons", {**MOONS, "by_solver": {"rk4": {"nfe16": {"w2": 0.2}}}})

    result = check(repo)

    assert result.returncode == 1
    assert "moons.by_solver.rk4.nfe16.w2" in result.stdout


def test_lower_accuracy_fails(repo):
    write_metrics(repo, "classifier", {**CLASSIFIER, "accuracy": 0.90})

    result = check(repo)

    assert result.returncode == 1
    assert "classifier.accuracy" in result.stdout


def test_change_within_tolerance_passes(repo):
    write_metrics(repo, "moons", {**MOONS, "w2": 0.082})

    assert check(repo).returncode == 0


def test_improvement_passes(repo):
    write_metrics(repo, "moons", {**MOONS, "w2": 0.01, "straightness": 0.2})

    result = check(repo, "--verbose")

    assert result.returncode == 0
    assert "moons.w2 " in result.stdout


def test_every_worse_metric_listed(repo):
    write_metrics(repo, "moons", {**MOONS, "w2": 0.2, "nll": 2.0, "straightness": 0.5})

    result = check(repo)

    assert result.returncode == 1
    for name in ("moons.w2 ", "moons.nll", "moons.straightness"):
        assert name in result.stdout, name


def test_new_metrics_pass(repo):
    write_metrics(repo, "moons", {**MOONS, "mmd": 0.3})
    write_metrics(repo, "digits", {"frechet": 4.0})

    result = check(repo)

    assert result.returncode == 0, result.stdout
    assert "moons.mmd" in result.stdout
    assert "digits.frechet" in result.stdout
    assert "do not fail the check" in result.stdout


def test_removed_metric_fails(repo):
    moons = {key: value for key, value in MOONS.items() if key != "nll"}
    write_metrics(repo, "moons", moons)

    result = check(repo)

    assert result.returncode == 1, result.stdout
    assert "1 removed" in result.stdout
    assert "moons.nll" in result.stdout
    assert "--allow-removed" in result.stdout


def test_removed_metrics_file_fails(repo):
    (repo / "reports" / "metrics" / "classifier.json").unlink()

    result = check(repo)

    assert result.returncode == 1, result.stdout
    assert "classifier.accuracy" in result.stdout
    assert "classifier.n_test" in result.stdout
    assert "reports/metrics/classifier.json" in result.stdout
    assert "passed" not in result.stdout


def test_allow_removed_passes(repo):
    (repo / "reports" / "metrics" / "classifier.json").unlink()
    moons = {key: value for key, value in MOONS.items() if key != "nll"}
    write_metrics(repo, "moons", moons)

    result = check(repo, "--allow-removed")

    assert result.returncode == 0, result.stdout
    assert "classifier.accuracy" in result.stdout
    assert "moons.nll" in result.stdout
    assert "passed" in result.stdout


def test_allow_removed_still_fails_worse(repo):
    (repo / "reports" / "metrics" / "classifier.json").unlink()
    write_metrics(repo, "moons", {**MOONS, "w2": 0.12})

    result = check(repo, "--allow-removed")

    assert result.returncode == 1, result.stdout
    assert "moons.w2 " in result.stdout


def test_timing_files_excluded(repo):
    write_metrics(repo, "train_moons", {"seconds": 1000.0}, folder="reports/timing")

    result = check(repo, "--metrics", "reports/*/*.json")

    assert result.returncode == 0, result.stdout
    assert "train_moons" not in result.stdout


def test_ignored_count_passes(repo):
    write_metrics(repo, "classifier", {**CLASSIFIER, "n_test": 10})

    assert check(repo).returncode == 0


def test_no_commit_yet_passes(tmp_path):
    git(tmp_path, "init", "-q")
    shutil.copy(REPO / "metrics_tolerances.yaml", tmp_path / "metrics_tolerances.yaml")
    write_metrics(tmp_path, "moons", MOONS)

    result = check(tmp_path)

    assert result.returncode == 0
    assert "nothing to compare against" in result.stdout


def test_unknown_rev_rejected(repo):
    result = check(repo, "--rev", "nosuchrev")

    assert result.returncode == 2, result.stdout
    assert "passed" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nosuchrev" in result.stderr
    assert "Traceback" not in result.stderr


def test_rev_of_a_tree_rejected(repo):
    result = check(repo, "--rev", "HEAD^{tree}")

    assert result.returncode == 2, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "HEAD^{tree}" in result.stderr


def test_earlier_rev_compared(repo):
    write_metrics(repo, "moons", {**MOONS, "w2": 0.12})
    git(repo, "commit", "-qam", "worse w2")

    result = check(repo, "--rev", "HEAD~1")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "moons.w2 " in result.stdout


def test_invalid_direction_rejected(repo):
    (repo / "metrics_tolerances.yaml").write_text("default:\n  direction: smaller\n  tolerance: 0.1\n")

    result = check(repo)

    assert result.returncode == 2
    assert "'smaller'" in result.stderr
    assert "lower, higher, either, ignore" in result.stderr


def test_invalid_json_named(repo):
    (repo / "reports" / "metrics" / "moons.json").write_text("{")

    result = check(repo)

    assert result.returncode == 2
    assert "reports/metrics/moons.json" in result.stderr


def test_non_utf8_workspace_file_named(repo):
    (repo / "reports" / "metrics" / "moons.json").write_bytes(b'{"w2": "\xff\xfe"}')

    result = check(repo)

    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "reports/metrics/moons.json" in result.stderr
    assert "UTF-8" in result.stderr


def test_non_utf8_committed_file_named(repo):
    (repo / "reports" / "metrics" / "moons.json").write_bytes(b'{"w2": "\xff\xfe"}')
    git(repo, "commit", "-qam", "corrupt moons")
    write_metrics(repo, "moons", MOONS)

    result = check(repo)

    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "HEAD:reports/metrics/moons.json" in result.stderr
    assert "UTF-8" in result.stderr


# json.dumps writes these as NaN, Infinity and -Infinity, which json.loads reads back.
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_fails(repo, value):
    # w2 is lower-is-better, so -Infinity would otherwise pass as an improvement.
    write_metrics(repo, "moons", {**MOONS, "w2": value})

    result = check(repo)

    assert result.returncode == 1, result.stdout
    assert "1 worse beyond tolerance" in result.stdout
    assert "moons.w2 " in result.stdout
    assert "not finite" in result.stdout


def test_non_finite_higher_is_better_fails(repo):
    write_metrics(repo, "classifier", {**CLASSIFIER, "accuracy": math.inf})

    result = check(repo)

    assert result.returncode == 1, result.stdout
    assert "classifier.accuracy" in result.stdout


def test_non_finite_ignored_metric_passes(repo):
    write_metrics(repo, "classifier", {**CLASSIFIER, "n_test": math.nan})

    result = check(repo)

    assert result.returncode == 0, result.stdout


def test_nan_at_base_and_now_passes(repo):
    write_metrics(repo, "classifier", {**CLASSIFIER, "accuracy": math.nan})
    git(repo, "commit", "-qam", "nan accuracy")

    result = check(repo)

    assert result.returncode == 0, result.stdout


def test_rule_order_first_match_wins():
    rules = metrics_check.load_rules(REPO / "metrics_tolerances.yaml")

    assert metrics_check.rule_for("moons.w2_floor", rules).direction == "either"
    assert metrics_check.rule_for("moons.w2", rules).direction == "lower"
    assert metrics_check.rule_for("classifier.accuracy", rules).direction == "higher"
    assert metrics_check.rule_for("classifier.n_test", rules).direction == "ignore"
    assert metrics_check.rule_for("digits.memorisation_reference_std", rules).direction == "either"
    assert metrics_check.rule_for("digits.memorisation", rules).direction == "higher"
    assert metrics_check.rule_for("digits.fid_floor", rules).direction == "either"
    assert metrics_check.rule_for("digits.fid", rules).direction == "lower"
    assert metrics_check.rule_for("moons.by_solver.rk4.nfe16.nfe_budget", rules).direction == "ignore"
    assert metrics_check.rule_for("moons.by_solver.dopri5.nfe64.nfe", rules).direction == "lower"
    assert metrics_check.rule_for("moons.by_solver.dopri5.nfe64.w2", rules).direction == "lower"
    assert metrics_check.rule_for("moons.by_solver.dopri5.nfe64.w2", rules).tolerance == 0.10
    assert metrics_check.rule_for("something.unknown", rules).pattern == "*"


@pytest.mark.parametrize(
    ("direction", "old", "new", "worse"),
    [
        ("lower", 1.0, 1.2, True),
        ("lower", 1.0, 0.5, False),
        ("higher", 1.0, 0.8, True),
        ("higher", 1.0, 2.0, False),
        ("either", 1.0, 0.8, True),
        ("either", 1.0, 1.05, False),
        ("ignore", 1.0, 100.0, False),
    ],
)
def test_is_worse_by_direction(direction, old, new, worse):
    rule = metrics_check.Rule("*", direction, 0.1, 0.0)

    assert metrics_check.is_worse(old, new, rule) is worse


@pytest.mark.parametrize("direction", ["lower", "higher", "either"])
@pytest.mark.parametrize("new", [math.nan, math.inf, -math.inf])
def test_is_worse_non_finite(direction, new):
    rule = metrics_check.Rule("*", direction, 0.1, 0.0)

    assert metrics_check.is_worse(1.0, new, rule) is True


@pytest.mark.parametrize("new", [math.nan, math.inf])
def test_is_worse_non_finite_ignored(new):
    rule = metrics_check.Rule("*", "ignore", 0.1, 0.0)

    assert metrics_check.is_worse(1.0, new, rule) is False


def test_abs_tolerance_near_zero():
    rule = metrics_check.Rule("*", "lower", 0.1, 1e-6)

    assert not metrics_check.is_worse(0.0, 1e-7, rule)
    assert metrics_check.is_worse(0.0, 1e-5, rule)
