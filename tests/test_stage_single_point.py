"""Stage single_point on tiny parameters in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flowmatch.schedules import SCHEDULE_NAMES
from stage_utils import cached_stage_runner, copy_params, read_json_strict, run_python_module
from stages import single_point
from stages.common import run_stage

FIGURES = ("moments.png", "convergence.png", "trajectories.png")

TINY = {
    "d": 2,
    "z_norm": 2.0,
    "n_samples": 4000,
    "t_grid": [0.0, 0.5, 0.99],
    "n_endpoints": 64,
    "steps": [4, 8, 16, 32],
    "solvers": ["euler", "midpoint", "heun", "rk4", "dopri5"],
    "tolerances": [1.0e-3, 1.0e-6],
    "n_trajectories": 4,
}


def write_params(directory: Path, schedule: str = "cosine", **overrides) -> None:
    copy_params(directory, {"single_point": {**TINY, **overrides}}, schedule)


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """Return a function that runs the stage once per (schedule, overrides) in its own directory and returns it."""
    return cached_stage_runner(tmp_path_factory, single_point.main, write_params)


def read_metrics(directory: Path) -> dict:
    return read_json_strict(directory / "reports/metrics/single_point.json")


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_moments_within_noise(stage_run, schedule):
    metrics = read_metrics(stage_run(schedule))

    assert metrics["mean_error_max_se"] < 4.5
    assert metrics["cov_error_max_se"] < 4.5
    assert 0.3 < metrics["mean_error_rms_se"] < 2.0


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_solver_reaches_z(stage_run, schedule):
    metrics = read_metrics(stage_run(schedule))

    for solver in TINY["solvers"]:
        assert metrics["endpoint_error_min"][solver] < 0.5, solver
    assert metrics["endpoint_error_min"]["dopri5"] < 1e-4


def test_stage_measures_solver_orders(stage_run):
    order = read_metrics(stage_run("cosine"))["order"]

    # The flow contracts every error made before the last step, so Euler and midpoint
    # show the order of their last step (2), while Heun and RK4 evaluate the velocity at
    # t = 1, where the x form can only return its limit, and drop to order 1.
    assert order["euler"] == pytest.approx(2.0, abs=0.3)
    assert order["midpoint"] == pytest.approx(2.0, abs=0.3)
    assert order["heun"] == pytest.approx(1.0, abs=0.3)
    assert order["rk4"] == pytest.approx(1.0, abs=0.3)
    assert "dopri5" not in order


def test_stage_writes_plots_and_figures(stage_run):
    directory = stage_run("linear")

    convergence = pd.read_csv(directory / "reports/plots/single_point_convergence.csv")
    assert list(convergence.columns) == ["solver", "steps", "tolerance", "nfe", "error"]
    assert len(convergence) == 4 * len(TINY["steps"]) + len(TINY["tolerances"])
    euler = convergence[convergence.solver == "euler"]
    assert euler.error.max() < 1e-12  # Euler is exact on the straight paths of the linear schedule

    moments = pd.read_csv(directory / "reports/plots/single_point_moments.csv")
    assert moments.t.tolist() == TINY["t_grid"]

    for name in FIGURES:
        with Image.open(directory / "reports/figures/single_point" / name) as image:
            assert image.width >= 600, name


def test_stage_projects_high_dimension(stage_run):
    directory = stage_run("cosine", d=5, solvers=["midpoint"])

    assert read_metrics(directory)["mean_error_max_se"] < 5
    assert (directory / "reports/figures/single_point/trajectories.png").is_file()


@pytest.mark.parametrize(
    ("key", "value"),
    [("solvers", ["euler", "leapfrog"]), ("tolerances", [0.0]), ("d", 0), ("t_grid", [0.5, 1.0])],
)
def test_bad_param_exits_two(in_tmp, capsys, key, value):
    write_params(in_tmp, **{key: value})

    with pytest.raises(SystemExit) as caught:
        run_stage(single_point.main)

    error = capsys.readouterr().err
    assert caught.value.code == 2
    assert len(error.strip().splitlines()) == 1
    assert f"single_point.{key}" in error
    assert not (in_tmp / "reports").exists()


def test_command_line_bad_param_exits_two(tmp_path):
    write_params(tmp_path, solvers=["leapfrog"])

    result = run_python_module("stages.single_point", tmp_path, timeout=120)

    assert result.returncode == 2
    assert "single_point.solvers[0]" in result.stderr
    assert not (tmp_path / "reports").exists()
