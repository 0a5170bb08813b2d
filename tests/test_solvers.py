import numpy as np
import pytest
import torch

from flowmatch.gaussian import GaussianPath
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule
from flowmatch.solvers import NFE_PER_STEP, SOLVERS, integrate, steps_for_nfe

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
_FACTOR = torch.tensor([[1.0, 0.3], [0.2, 0.5]], dtype=torch.float64)
COV = _FACTOR @ _FACTOR.T
FIXED_SOLVERS = ["euler", "midpoint", "heun", "rk4"]
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
# Step counts in each solver's asymptotic range, above float64 round-off for the closed form.
ORDER_STEPS = {"euler": [32, 64, 128, 256, 512], "midpoint": [16, 32, 64, 128, 256], "heun": [16, 32, 64, 128, 256], "rk4": [8, 16, 32, 64, 128]}


def _gaussian_path(name="cosine"):
    return GaussianPath(MEAN, COV, get_schedule(name))


def _x0(n=64, dtype=torch.float64):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)).to(dtype)


class CountingVelocity:
    def __init__(self, velocity):
        self.velocity = velocity
        self.times = []

    def __call__(self, x, t):
        self.times.append(t)
        return self.velocity(x, t)


def measured_order(path, solver):
    x0 = _x0()
    exact = path.flow(x0, 1.0)
    steps = ORDER_STEPS[solver]
    errors = [(integrate(path.velocity, x0, solver=solver, steps=n).x - exact).abs().max().item() for n in steps]
    slope, _ = np.polyfit(np.log(steps), np.log(errors), 1)
    return -slope


# The linear schedule is left out: its Gaussian flow cancels the leading error term of
# midpoint (measured order 3.0) and rk4 (4.5 over these steps).
@pytest.mark.parametrize("schedule", ["cosine", "polynomial"])
@pytest.mark.parametrize("solver", FIXED_SOLVERS)
def test_convergence_order(solver, schedule):
    order = measured_order(_gaussian_path(schedule), solver)
    assert abs(order - ORDERS[solver]) < 0.3, f"{solver} on {schedule}: measured order {order:.3f}"


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_dopri5_meets_tolerance(name):
    path = _gaussian_path(name)
    x0 = _x0()
    result = integrate(path.velocity, x0, solver="dopri5", atol=1e-9, rtol=1e-9)
    assert (result.x - path.flow(x0, 1.0)).abs().max().item() < 1e-7


@pytest.mark.parametrize("solver", SOLVERS)
def test_round_trip_returns_start(solver):
    path = _gaussian_path()
    x1 = path.sample(64, 1.0, torch.Generator().manual_seed(1))
    options = {"steps": 200, "atol": 1e-9, "rtol": 1e-9}
    noise = integrate(path.velocity, x1, solver=solver, t0=1.0, t1=0.0, **options).x
    back = integrate(path.velocity, noise, solver=solver, **options).x
    bound = {"euler": 0.05, "midpoint": 1e-4, "heun": 1e-4, "rk4": 1e-8, "dopri5": 1e-7}[solver]
    assert (back - x1).abs().max().item() < bound


@pytest.mark.parametrize("solver", SOLVERS)
def test_backward_reaches_exact_noise(solver):
    path = _gaussian_path()
    x0 = _x0()
    x1 = path.flow(x0, 1.0)
    result = integrate(path.velocity, x1, solver=solver, steps=400, t0=1.0, t1=0.0, atol=1e-9, rtol=1e-9)
    bound = {"euler": 0.02, "midpoint": 1e-4, "heun": 1e-4, "rk4": 1e-8, "dopri5": 1e-7}[solver]
    assert (result.x - x0).abs().max().item() < bound


@pytest.mark.parametrize("solver", FIXED_SOLVERS)
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_fixed_nfe_exact(solver, steps):
    counter = CountingVelocity(_gaussian_path().velocity)
    result = integrate(counter, _x0(), solver=solver, steps=steps)
    assert result.nfe == steps * NFE_PER_STEP[solver]
    assert len(counter.times) == result.nfe
    assert result.steps == steps


def test_dopri5_nfe_counts_every_call():
    counter = CountingVelocity(_gaussian_path().velocity)
    result = integrate(counter, _x0(), solver="dopri5")
    assert result.nfe == len(counter.times)
    assert result.nfe > 0


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0), (0.2, 0.7)])
def test_dopri5_stays_inside_interval(t0, t1):
    counter = CountingVelocity(_gaussian_path().velocity)
    integrate(counter, _x0(), solver="dopri5", t0=t0, t1=t1)
    times = torch.stack(counter.times)
    assert times.min().item() >= min(t0, t1)
    assert times.max().item() <= max(t0, t1)


def test_dopri5_tighter_tolerance_costs_more():
    path = _gaussian_path()
    loose = integrate(path.velocity, _x0(), solver="dopri5", atol=1e-3, rtol=1e-3)
    tight = integrate(path.velocity, _x0(), solver="dopri5", atol=1e-9, rtol=1e-9)
    assert tight.nfe > loose.nfe


@pytest.mark.parametrize("solver", SOLVERS)
def test_time_is_0d_tensor_of_state_dtype(solver):
    counter = CountingVelocity(_gaussian_path().velocity)
    integrate(counter, _x0(dtype=torch.float32), solver=solver, steps=2)
    for t in counter.times:
        assert t.ndim == 0
        assert t.dtype == torch.float32


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_state_keeps_dtype(solver):
    result = integrate(_gaussian_path().velocity, _x0(dtype=torch.float32), solver=solver, steps=8)
    assert result.x.dtype == torch.float32


@pytest.mark.parametrize("solver", FIXED_SOLVERS)
def test_fixed_record_path(solver):
    path = _gaussian_path()
    x0 = _x0()
    result = integrate(path.velocity, x0, solver=solver, steps=5, record=True)
    assert result.path.shape == (6, 64, 2)
    torch.testing.assert_close(result.times, torch.linspace(0, 1, 6, dtype=torch.float64))
    torch.testing.assert_close(result.path[0], x0)
    torch.testing.assert_close(result.path[-1], result.x)


def test_dopri5_record_path_on_exact_flow():
    path = _gaussian_path()
    x0 = _x0()
    result = integrate(path.velocity, x0, solver="dopri5", atol=1e-9, rtol=1e-9, record=True)
    assert result.times[0].item() == 0.0
    assert result.times[-1].item() == 1.0
    assert (result.times.diff() > 0).all()
    assert result.path.shape == (len(result.times), 64, 2)
    assert result.steps == len(result.times) - 1
    torch.testing.assert_close(result.path[-1], result.x)
    for t, state in zip(result.times, result.path):
        torch.testing.assert_close(state, path.flow(x0, t.item()), rtol=0, atol=1e-7)


def test_dopri5_record_backward():
    path = _gaussian_path()
    result = integrate(path.velocity, _x0(), solver="dopri5", t0=1.0, t1=0.0, record=True)
    assert result.times[0].item() == 1.0
    assert result.times[-1].item() == 0.0
    assert (result.times.diff() < 0).all()


def test_no_record_no_path():
    result = integrate(_gaussian_path().velocity, _x0(), solver="rk4", steps=2)
    assert result.path is None


def test_images_shape_supported():
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    for solver in SOLVERS:
        result = integrate(lambda x, t: -x, x0, solver=solver, steps=50, atol=1e-8, rtol=1e-8)
        assert result.x.shape == x0.shape
        # Euler with 50 steps gives (1 - 1/50)^50, 1 % below exp(-1).
        torch.testing.assert_close(result.x, x0 * np.exp(-1), rtol=0.02, atol=0)


@pytest.mark.parametrize("solver, nfe, steps", [("euler", 8, 8), ("midpoint", 8, 4), ("heun", 9, 4), ("rk4", 16, 4), ("rk4", 7, 1)])
def test_steps_for_nfe(solver, nfe, steps):
    assert steps_for_nfe(solver, nfe) == steps


def test_steps_for_nfe_rejects():
    with pytest.raises(ValueError, match="fixed-step"):
        steps_for_nfe("dopri5", 32)
    with pytest.raises(ValueError, match="below"):
        steps_for_nfe("rk4", 3)


def test_integrate_rejects_bad_arguments():
    velocity = _gaussian_path().velocity
    with pytest.raises(ValueError, match="accepted: euler"):
        integrate(velocity, _x0(), solver="rk45", steps=4)
    with pytest.raises(ValueError, match="steps >= 1"):
        integrate(velocity, _x0(), solver="rk4")
    with pytest.raises(ValueError, match="steps >= 1"):
        integrate(velocity, _x0(), solver="euler", steps=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_empty_interval_returns_start(solver):
    x0 = _x0()
    result = integrate(_gaussian_path().velocity, x0, solver=solver, steps=3, t0=0.4, t1=0.4)
    torch.testing.assert_close(result.x, x0)


def test_dopri5_steps_without_record():
    path = _gaussian_path()
    plain = integrate(path.velocity, _x0(), solver="dopri5")
    recorded = integrate(path.velocity, _x0(), solver="dopri5", record=True)
    assert plain.steps == recorded.steps
    assert plain.steps > 0
    # Each dopri5 step evaluates six new stages (its seventh is the next step's first),
    # and rejected steps and the first-step probe add more.
    assert plain.nfe >= 6 * plain.steps
