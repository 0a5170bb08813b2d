import math

import pytest
import torch

from flowmatch.gaussian import GaussianPath
from flowmatch.likelihood import (
    divergence_exact,
    divergence_hutchinson,
    draw_probes,
    log_likelihood,
    standard_normal_log_density,
)
from flowmatch.marginal import marginal_velocity
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
_FACTOR = torch.tensor([[1.0, 0.3], [0.2, 0.5]], dtype=torch.float64)
COV = _FACTOR @ _FACTOR.T
TIGHT = {"atol": 1e-8, "rtol": 1e-8}


def _gaussian_path(name="cosine"):
    return GaussianPath(MEAN, COV, get_schedule(name))


def _mixture_velocity(data, schedule):
    return lambda x, t: marginal_velocity(x, t, data, schedule)


def _mixture_log_density(x, t, data, schedule):
    """Exact log p_t for the empirical distribution of ``data``: an equal-weight Gaussian mixture."""
    values = schedule(torch.as_tensor(t, dtype=torch.float64))
    squared = ((x[:, None, :] - values.alpha * data[None]) ** 2).sum(-1)
    dim = x.shape[1]
    log_components = -0.5 * squared / values.beta**2 - dim * torch.log(values.beta) - 0.5 * dim * math.log(2 * math.pi)
    return torch.logsumexp(log_components, dim=1) - math.log(data.shape[0])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_gaussian_log_density_matches_closed_form(name):
    path = _gaussian_path(name)
    x1 = path.sample(16, 1.0, torch.Generator().manual_seed(0))
    # The vp schedule starts from N(alpha_0 mean, ...), not exactly N(0, I), so the exact p_0 is used.
    log_p = log_likelihood(path.velocity, x1, log_p0=lambda x: path.log_density(x, 0.0), **TIGHT)
    error = (log_p - path.log_density(x1, 1.0)).abs().max().item()
    assert error < 1e-3, f"{name}: {error:.2e} nats"


def test_vp_standard_normal_base_is_approximate():
    path = _gaussian_path("vp")
    x1 = path.sample(16, 1.0, torch.Generator().manual_seed(0))
    error = (log_likelihood(path.velocity, x1, **TIGHT) - path.log_density(x1, 1.0)).abs().max().item()
    assert 1e-4 < error < 0.1


@pytest.mark.parametrize("solver, steps", [("rk4", 50), ("heun", 200), ("midpoint", 200)])
def test_fixed_step_solvers_close(solver, steps):
    path = _gaussian_path("linear")
    x1 = path.sample(16, 1.0, torch.Generator().manual_seed(0))
    log_p = log_likelihood(path.velocity, x1, solver=solver, steps=steps)
    assert (log_p - path.log_density(x1, 1.0)).abs().max().item() < 1e-3


def test_one_dimensional_gaussian_normalised():
    path = GaussianPath(torch.tensor([0.8]), torch.tensor([[0.3]]), get_schedule("linear"))
    grid = torch.linspace(-4.0, 6.0, 401, dtype=torch.float64)[:, None]
    log_p = log_likelihood(path.velocity, grid, **TIGHT)
    mass = torch.trapezoid(log_p.exp(), grid[:, 0]).item()
    assert mass == pytest.approx(1.0, abs=0.01)


def test_one_dimensional_mixture_normalised():
    # A nonlinear velocity: the exact marginal velocity of four points, started at t1 = 0.9
    # where the density is a mixture of Gaussians of width beta = 0.1 (finite, unlike t = 1).
    schedule = get_schedule("linear")
    data = torch.tensor([[-1.5], [-0.2], [0.4], [1.8]], dtype=torch.float64)
    grid = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)[:, None]
    log_p = log_likelihood(_mixture_velocity(data, schedule), grid, t1=0.9, atol=1e-7, rtol=1e-7)
    mass = torch.trapezoid(log_p.exp(), grid[:, 0]).item()
    assert mass == pytest.approx(1.0, abs=0.01)
    assert (log_p - _mixture_log_density(grid, 0.9, data, schedule)).abs().max().item() < 1e-3


def test_exact_divergence_is_jacobian_trace():
    path = _gaussian_path()
    x = path.sample(8, 0.5, torch.Generator().manual_seed(1))
    t = torch.tensor(0.5, dtype=torch.float64)
    u, divergence = divergence_exact(path.velocity, x, t)
    jacobian = torch.autograd.functional.jacobian(lambda y: path.velocity(y[None], t)[0], x[0])
    torch.testing.assert_close(u, path.velocity(x, t))
    torch.testing.assert_close(divergence, torch.full((8,), torch.trace(jacobian).item(), dtype=torch.float64))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_within_standard_error(kind):
    schedule = get_schedule("cosine")
    generator = torch.Generator().manual_seed(2)
    data = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    velocity = _mixture_velocity(data, schedule)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    t = torch.tensor(0.7, dtype=torch.float64)

    _, exact = divergence_exact(velocity, x, t)
    probes = draw_probes(x.shape, 200, kind, generator, x.dtype, x.device)
    _, estimates = divergence_hutchinson(velocity, x, t, probes)
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    assert (standard_error > 0).all()
    assert ((mean - exact).abs() < 4 * standard_error).all()


def test_rademacher_probes_are_signs():
    probes = draw_probes(torch.Size([4, 3]), 10, "rademacher", torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert probes.shape == (10, 4, 3)
    assert set(probes.unique().tolist()) == {-1.0, 1.0}


def test_hutchinson_log_likelihood_unbiased():
    path = _gaussian_path()
    x1 = path.sample(64, 1.0, torch.Generator().manual_seed(3))
    exact = log_likelihood(path.velocity, x1, **TIGHT)
    estimate = log_likelihood(path.velocity, x1, divergence="hutchinson", n_probes=2, generator=torch.Generator().manual_seed(4), **TIGHT)
    difference = estimate - exact
    standard_error = difference.std() / math.sqrt(len(difference))
    assert standard_error.item() > 0
    assert difference.mean().abs().item() < 4 * standard_error.item()


def test_hutchinson_reproducible_with_generator():
    path = _gaussian_path()
    x1 = path.sample(8, 1.0, torch.Generator().manual_seed(5))
    first = log_likelihood(path.velocity, x1, divergence="hutchinson", generator=torch.Generator().manual_seed(6))
    second = log_likelihood(path.velocity, x1, divergence="hutchinson", generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_image_shaped_input():
    # A velocity on (n, 1, 2, 2) images that is the Gaussian velocity on the flattened vector.
    path = GaussianPath(torch.zeros(4, dtype=torch.float64), 0.5 * torch.eye(4, dtype=torch.float64), get_schedule("linear"))
    x1 = path.sample(6, 1.0, torch.Generator().manual_seed(7))
    log_p = log_likelihood(lambda x, t: path.velocity(x.flatten(1), t).reshape(x.shape), x1.reshape(6, 1, 2, 2), **TIGHT)
    assert (log_p - path.log_density(x1, 1.0)).abs().max().item() < 1e-3


def test_standard_normal_log_density():
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    reference = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(standard_normal_log_density(x), reference)


def test_rejects_bad_arguments():
    path = _gaussian_path()
    x1 = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="accepted: exact, hutchinson"):
        log_likelihood(path.velocity, x1, divergence="trace")
    with pytest.raises(ValueError, match="n_probes >= 1"):
        log_likelihood(path.velocity, x1, divergence="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="accepted: rademacher, gaussian"):
        log_likelihood(path.velocity, x1, divergence="hutchinson", probe="uniform")
