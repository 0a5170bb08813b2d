"""Stage marginal_flow on tiny parameters and tiny prepared data in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowmatch.gaussian import GaussianPath
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule
from stage_utils import cached_stage_runner, copy_params, read_json_strict
from stages import gaussian_checks, marginal_flow
from stages.common import run_stage

FIGURES = ("landing.png", "velocity_density.png", "gaussian_mc.png", "gaussian_flow.png", "continuity.png", "solver_convergence.png", "likelihood.png")
SOLVER_ORDERS = {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}
# Schedules under which v(t) = alpha_t^2 lam + beta_t^2 is quadratic in t, where the
# midpoint rule's h^2 error term on the Gaussian flow integrates to zero.
QUADRATIC_VARIANCE_SCHEDULES = ("linear", "linear_vp")

TINY = {
    "dataset": "moons",
    "n_points": 16,
    "n_samples": 128,
    "solver": "dopri5",
    "steps": 20,
    "tolerance": 1.0e-5,
    "t_grid": [0.5, 0.99],
    "radius": 0.01,
    "mc_sizes": [200, 800, 3200],
    "mc_n_query": 24,
    "mc_t_grid": [0.5],
    "continuity_t_grid": [0.5],
    "continuity_spacings": [0.1, 0.05, 0.025],
}


def write_params(directory: Path, schedule: str = "cosine", **overrides) -> None:
    copy_params(directory, {"marginal_flow": {**TINY, **overrides}}, schedule)


def write_prepared(directory: Path) -> None:
    """Write a small two-cluster toy set as moons.npz and a 2-D Gaussian as gaussian.npz."""
    rng = np.random.default_rng(0)
    prepared = directory / "data/prepared"
    prepared.mkdir(parents=True)

    def toy(n):
        centres = rng.choice(np.array([[-1.0, 0.0], [1.0, 0.5]]), size=n)
        return (centres + 0.3 * rng.standard_normal((n, 2))).astype(np.float32)

    np.savez(prepared / "moons.npz", train=toy(64), test=toy(256))
    mean = np.array([0.3, -0.2])
    cov = np.array([[0.8, -0.3], [-0.3, 0.4]])
    samples = rng.multivariate_normal(mean, cov, size=64).astype(np.float32)
    np.savez(prepared / "gaussian.npz", train=samples, test=samples, mean=mean, cov=cov)


def write_inputs(directory: Path, schedule: str, **overrides) -> None:
    write_prepared(directory)
    write_params(directory, schedule, **overrides)


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run in a directory with tiny prepared data."""
    write_prepared(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """Return a function that runs the stage once per (schedule, overrides) in its own directory and returns it."""
    return cached_stage_runner(tmp_path_factory, marginal_flow.main, write_inputs)


def read_metrics(directory: Path) -> dict:
    return read_json_strict(directory / "reports/metrics/marginal_flow.json")


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_exact_flow_memorises(stage_run, schedule):
    memorisation = read_metrics(stage_run(schedule))["memorisation"]

    assert memorisation["fraction_within_radius"] > 0.95
    assert memorisation["test_fraction_within_radius"] < 0.2


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_monte_carlo_within_noise(stage_run, schedule):
    mc = read_metrics(stage_run(schedule))["gaussian_mc"]

    assert 0.5 < mc["z_rms"] < 1.6
    assert mc["z_max"] < 5
    assert mc["error_slope"] == pytest.approx(-0.5, abs=0.2)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_gaussian_flow_matches_moments(stage_run, schedule):
    flow = read_metrics(stage_run(schedule))["gaussian_flow"]

    assert flow["mean_error_max_se"] < 4
    assert flow["cov_error_max_se"] < 4
    assert flow["solver_error_rms"] < 1e-3


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_continuity_residual_converges(stage_run, schedule):
    continuity = read_metrics(stage_run(schedule))["continuity"]

    assert continuity["residual_1d"] < 0.05
    assert continuity["residual_2d"] < 0.05
    assert continuity["order_1d"] == pytest.approx(2.0, abs=0.3)
    assert continuity["order_2d"] == pytest.approx(2.0, abs=0.3)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_solver_orders_reference_schedule(stage_run, schedule):
    metrics = read_metrics(stage_run(schedule))

    assert metrics["solver_order_schedules"] == {"reference": "cosine", "study": schedule}
    for solver, expected in SOLVER_ORDERS.items():
        assert metrics["solver_order"][solver] == pytest.approx(expected, abs=0.3), solver


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_solver_orders_study_schedule(stage_run, schedule):
    orders = read_metrics(stage_run(schedule))["solver_order_study"]
    expected = dict(SOLVER_ORDERS, midpoint=3.0) if schedule in QUADRATIC_VARIANCE_SCHEDULES else SOLVER_ORDERS

    for solver, order in expected.items():
        assert orders[solver] == pytest.approx(order, abs=0.3), solver


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_likelihood_matches_closed_form(stage_run, schedule):
    metrics = read_metrics(stage_run(schedule))

    assert metrics["likelihood_error_max"] < 1e-6
    assert metrics["hutchinson_z"] < 5
    assert 0.7 < metrics["likelihood"]["hutchinson_z_rms"] < 1.3
    assert abs(metrics["likelihood"]["hutchinson_z_mean"]) < 0.4


def test_fitted_order_of_power_law():
    steps = [16, 32, 64, 128]

    assert gaussian_checks.fitted_order(steps, [3.0 * s**-2.5 for s in steps]) == pytest.approx(2.5, abs=1e-12)


def test_fitted_order_skips_rounding_level():
    steps = [16, 32, 64, 128]

    assert gaussian_checks.fitted_order(steps, [1e-6 * s**-4 for s in steps]) is None
    assert gaussian_checks.fitted_order(steps, [16.0**-4, 32.0**-4, 1e-14, 1e-15]) == pytest.approx(4.0)


def test_hutchinson_standard_error_matches_probes():
    rng = np.random.default_rng(3)
    factor = rng.standard_normal((4, 4))
    cov = torch.tensor(factor @ factor.T / 4 + 0.1 * np.eye(4))
    path = GaussianPath(torch.zeros(4, dtype=torch.float64), cov, get_schedule("linear"))
    # Integral of div u_t over [0, 1] as a matrix: half the log of cov_1 over cov_0 (which share eigenvectors).
    eigenvalues_1, vectors = torch.linalg.eigh(path.cov_t(1.0))
    eigenvalues_0 = torch.diagonal(vectors.T @ path.cov_t(0.0) @ vectors)
    m = (vectors * (0.5 * torch.log(eigenvalues_1 / eigenvalues_0))) @ vectors.T
    probes = torch.randint(0, 2, (200_000, 4), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    estimates = torch.einsum("ki,ij,kj->k", probes, m, probes)

    assert float(estimates.mean()) == pytest.approx(float(torch.trace(m)), abs=0.01)
    assert gaussian_checks.hutchinson_standard_error(path, 1) == pytest.approx(float(estimates.std()), rel=0.01)
    assert gaussian_checks.hutchinson_standard_error(path, 4) == pytest.approx(float(estimates.std()) / 2, rel=0.01)


def test_hutchinson_standard_error_zero_for_diagonal_cov():
    path = GaussianPath(torch.zeros(3, dtype=torch.float64), torch.diag(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)), get_schedule("cosine"))

    assert gaussian_checks.hutchinson_standard_error(path, 1) == pytest.approx(0.0, abs=1e-12)


def test_stage_writes_plots_and_figures(stage_run):
    directory = stage_run("cosine")

    mc = pd.read_csv(directory / "reports/plots/marginal_mc_convergence.csv")
    assert sorted(mc.m.unique().tolist()) == TINY["mc_sizes"]
    continuity = pd.read_csv(directory / "reports/plots/marginal_continuity.csv")
    assert list(continuity.columns) == ["dim", "t", "h", "relative_residual"]
    assert len(continuity) == 2 * len(TINY["continuity_spacings"])
    solvers = pd.read_csv(directory / "reports/plots/solver_convergence.csv")
    assert list(solvers.columns) == ["role", "schedule", "solver", "steps", "nfe", "error"]
    assert len(solvers) == 2 * len(gaussian_checks.ORDER_SOLVERS) * len(gaussian_checks.ORDER_STEPS)
    assert (solvers.error > 0).all()

    for name in FIGURES:
        with Image.open(directory / "reports/figures/marginal" / name) as image:
            assert image.width >= 600, name


def test_fixed_step_solver_runs(stage_run):
    memorisation = read_metrics(stage_run("cosine", solver="rk4", steps=40))["memorisation"]

    assert memorisation["fraction_within_radius"] > 0.5


def test_gaussian_in_three_dimensions(in_tmp):
    rng = np.random.default_rng(1)
    factor = rng.standard_normal((3, 3))
    mean, cov = rng.standard_normal(3), factor @ factor.T / 3 + 0.2 * np.eye(3)
    samples = rng.multivariate_normal(mean, cov, size=32).astype(np.float32)
    np.savez(in_tmp / "data/prepared/gaussian.npz", train=samples, test=samples, mean=mean, cov=cov)
    write_params(in_tmp, "cosine")

    marginal_flow.main()

    metrics = read_metrics(in_tmp)
    assert 0.5 < metrics["gaussian_mc"]["z_rms"] < 1.6
    assert metrics["gaussian_flow"]["cov_error_max_se"] < 4.5
    assert (in_tmp / "reports/figures/marginal/gaussian_flow.png").is_file()


@pytest.mark.parametrize(
    ("key", "value"),
    [("dataset", "digits"), ("mc_sizes", [1]), ("continuity_t_grid", [0.05]), ("radius", 0)],
)
def test_bad_param_exits_two(in_tmp, capsys, key, value):
    write_params(in_tmp, **{key: value})

    with pytest.raises(SystemExit) as caught:
        run_stage(marginal_flow.main)

    error = capsys.readouterr().err
    assert caught.value.code == 2
    assert len(error.strip().splitlines()) == 1
    assert f"marginal_flow.{key}" in error
    assert not (in_tmp / "reports").exists()


def test_missing_data_exits_two(tmp_path, monkeypatch, capsys):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as caught:
        run_stage(marginal_flow.main)

    assert caught.value.code == 2
    assert "moons.npz" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
