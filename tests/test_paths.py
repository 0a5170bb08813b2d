import pytest
import torch

from flowmatch.paths import (
    beta_d_beta,
    conditional_velocity,
    conditional_velocity_x,
    expand_time,
    sample_x_t,
)
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule
from flowmatch.solvers import SOLVERS, integrate

SCHEDULES = [get_schedule(name) for name in SCHEDULE_NAMES]
INTERIOR_TIMES = [0.0, 0.1, 0.37, 0.5, 0.8, 0.99]


@pytest.fixture(params=SCHEDULES, ids=SCHEDULE_NAMES)
def schedule(request):
    return request.param


@pytest.fixture
def z_eps():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, dtype=torch.float64, generator=generator)
    eps = torch.randn(64, 3, dtype=torch.float64, generator=generator)
    return z, eps


def test_expand_time_shapes():
    like = torch.zeros(5, 3, 2)
    assert expand_time(0.5, like).shape == ()
    assert expand_time(torch.rand(5), like).shape == (5, 1, 1)
    assert expand_time(torch.rand(5, dtype=torch.float64), like).dtype == torch.float32


def test_sample_x_t_endpoints(z_eps):
    z, eps = z_eps
    schedule = get_schedule("linear")
    torch.testing.assert_close(sample_x_t(z, eps, 0.0, schedule), eps)
    torch.testing.assert_close(sample_x_t(z, eps, 1.0, schedule), z)


def test_conditional_velocity_is_path_derivative(schedule, z_eps):
    z, eps = z_eps
    t = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01

    def path(times):
        return sample_x_t(z, eps, times, schedule)

    _, derivative = torch.autograd.functional.jvp(path, t, torch.ones_like(t))
    torch.testing.assert_close(conditional_velocity(z, eps, t, schedule), derivative, rtol=1e-10, atol=1e-10)


def test_conditional_velocity_x_is_path_derivative(schedule, z_eps):
    z, eps = z_eps
    h = 1e-6
    for t in INTERIOR_TIMES[1:]:
        x_t = sample_x_t(z, eps, t, schedule)
        derivative = (sample_x_t(z, eps, t + h, schedule) - sample_x_t(z, eps, t - h, schedule)) / (2 * h)
        torch.testing.assert_close(conditional_velocity_x(x_t, z, t, schedule), derivative, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_conditional_velocity_forms_agree(schedule, z_eps, t):
    z, eps = z_eps
    x_t = sample_x_t(z, eps, t, schedule)
    torch.testing.assert_close(conditional_velocity_x(x_t, z, t, schedule), conditional_velocity(z, eps, t, schedule), rtol=1e-9, atol=1e-9)


def test_conditional_velocity_x_per_row_time(schedule, z_eps):
    z, eps = z_eps
    t = torch.linspace(0.0, 0.99, 64, dtype=torch.float64)
    x_t = sample_x_t(z, eps, t, schedule)
    torch.testing.assert_close(conditional_velocity_x(x_t, z, t, schedule), conditional_velocity(z, eps, t, schedule), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conditional_velocity_x_finite_at_one(schedule, z_eps, dtype):
    z, eps = (tensor.to(dtype) for tensor in z_eps)
    u = conditional_velocity_x(eps, z, torch.tensor(1.0, dtype=dtype), schedule)
    assert torch.isfinite(u).all()


def test_conditional_velocity_x_limit_at_one(schedule, z_eps):
    z, _ = z_eps
    d_alpha_1 = schedule(torch.tensor(1.0, dtype=torch.float64)).d_alpha
    torch.testing.assert_close(conditional_velocity_x(z, z, 1.0, schedule), d_alpha_1 * z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conditional_velocity_x_finite_near_one(schedule, z_eps, dtype):
    z, eps = (tensor.to(dtype) for tensor in z_eps)
    times = 1 - torch.logspace(-1, -15, 29, dtype=torch.float64)
    for t in times.to(dtype):
        assert torch.isfinite(conditional_velocity_x(eps, z, t, schedule)).all()


def test_beta_d_beta_matches_product(schedule):
    t = torch.linspace(0.0, 0.999, 500, dtype=torch.float64)
    values = schedule(t)
    torch.testing.assert_close(beta_d_beta(values, schedule), values.beta * values.d_beta, rtol=1e-10, atol=1e-12)


def test_beta_d_beta_finite_at_one(schedule):
    values = schedule(torch.tensor(1.0, dtype=torch.float64))
    assert torch.isfinite(beta_d_beta(values, schedule))


def test_linear_one_euler_step_exact(z_eps):
    z, eps = z_eps
    schedule = get_schedule("linear")
    result = integrate(lambda x, t: conditional_velocity_x(x, z, t, schedule), eps, solver="euler", steps=1)
    torch.testing.assert_close(result.x, z, rtol=0, atol=1e-12)


def test_linear_euler_exact_from_any_time(z_eps):
    z, eps = z_eps
    schedule = get_schedule("linear")
    x_t = sample_x_t(z, eps, 0.3, schedule)
    result = integrate(lambda x, t: conditional_velocity_x(x, z, t, schedule), x_t, solver="euler", steps=1, t0=0.3)
    torch.testing.assert_close(result.x, z, rtol=0, atol=1e-12)


def _endpoint_errors(schedule, solver, steps, dtype=torch.float64):
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(256, 2, generator=generator).to(dtype)
    z = torch.tensor([[2.0, 1.0]], dtype=dtype)
    result = integrate(lambda x, t: conditional_velocity_x(x, z, t, schedule), x0, solver=solver, steps=steps, atol=1e-6, rtol=1e-6)
    return result.x, (result.x - z).norm(dim=1)


@pytest.mark.parametrize("solver", SOLVERS)
def test_conditional_flow_reaches_z(schedule, solver):
    # Fixed-step error bounds measured with 256 steps: the singular schedules converge
    # only like sqrt(h), because their paths are sqrt(1 - t) near t = 1.
    if solver == "dopri5":
        x, error = _endpoint_errors(schedule, solver, None)
        bound = 1e-3
    else:
        x, error = _endpoint_errors(schedule, solver, 256)
        bound = 0.4 if schedule.singular_at_one else 0.03
    assert torch.isfinite(x).all()
    assert error.max().item() < bound


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
def test_conditional_flow_error_shrinks(schedule, solver):
    _, coarse = _endpoint_errors(schedule, solver, 16)
    _, fine = _endpoint_errors(schedule, solver, 256)
    # Euler and midpoint are exact for the linear schedule, so both errors can be 0.
    assert fine.mean().item() <= 0.5 * coarse.mean().item() + 1e-12


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_conditional_flow_finite_few_steps(schedule, solver, steps):
    x, _ = _endpoint_errors(schedule, solver, steps, dtype=torch.float32)
    assert torch.isfinite(x).all()


def test_conditional_flow_dopri5_float32(schedule):
    x, error = _endpoint_errors(schedule, "dopri5", None, dtype=torch.float32)
    assert torch.isfinite(x).all()
    assert error.max().item() < 0.02
