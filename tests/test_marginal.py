"""The marginal velocity, posterior weights, mixture density and Monte Carlo estimator against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.gaussian import GaussianPath
from flowmatch.marginal import (
    marginal_velocity,
    mixture_log_density,
    monte_carlo_velocity,
    posterior_log_weights,
    posterior_mean,
)
from flowmatch.paths import conditional_velocity_x
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule

TIMES = (0.0, 0.3, 0.7, 0.99, 1.0 - 1e-6, 1.0)


def points(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_one_point_equals_conditional_velocity(name):
    schedule = get_schedule(name)
    z = points(1, 3, seed=0)
    x = points(50, 3, seed=1)

    for t in TIMES:
        expected = conditional_velocity_x(x, z, t, schedule)
        actual = marginal_velocity(x, t, z, schedule)
        assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-10), t


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_posterior_weights_sum_to_one(name):
    schedule = get_schedule(name)
    data = points(40, 2, seed=2)
    x = points(30, 2, seed=3, scale=2.0)

    for t in TIMES:
        log_weights = posterior_log_weights(x, t, data, schedule)
        weights = log_weights.exp()
        assert not torch.isnan(log_weights).any(), t
        assert torch.allclose(weights.sum(1), torch.ones(30, dtype=torch.float64), atol=1e-12), t


def test_posterior_weights_are_softmax():
    schedule = get_schedule("cosine")
    data = points(7, 2, seed=4)
    x = points(5, 2, seed=5)
    t = 0.6
    alpha, beta = math.sin(0.3 * math.pi), math.cos(0.3 * math.pi)

    log_likelihood = torch.stack([-((x - alpha * z) ** 2).sum(1) / (2 * beta**2) for z in data], dim=1)
    expected = torch.softmax(log_likelihood, dim=1)

    assert torch.allclose(posterior_log_weights(x, t, data, schedule).exp(), expected, atol=1e-12)


def test_posterior_near_one_picks_nearest_point():
    schedule = get_schedule("linear")
    data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.2, 0.1]], dtype=torch.float64)

    for t in (1.0 - 1e-9, 1.0):
        weights = posterior_log_weights(x, t, data, schedule).exp()
        assert torch.isfinite(weights).all(), t
        assert weights.argmax(1).tolist() == [1, 2, 0], t
        assert torch.allclose(weights.max(1).values, torch.ones(3, dtype=torch.float64)), t


def test_velocity_at_one_is_finite_limit():
    schedule = get_schedule("vp")
    data = points(10, 2, seed=6)
    x = points(20, 2, seed=7)

    velocity = marginal_velocity(x, 1.0, data, schedule)
    nearest = data[torch.cdist(x, data).argmin(1)]
    d_alpha = schedule(torch.tensor(1.0, dtype=torch.float64)).d_alpha

    assert torch.isfinite(velocity).all()
    assert torch.allclose(velocity, d_alpha * nearest)


def test_chunks_match_one_batch():
    schedule = get_schedule("polynomial")
    data = points(33, 3, seed=8)
    x = points(101, 3, seed=9)

    whole = marginal_velocity(x, 0.8, data, schedule)
    chunked = marginal_velocity(x, 0.8, data, schedule, batch_size=7)

    assert torch.allclose(whole, chunked, rtol=1e-12, atol=1e-12)


def test_time_per_row_matches_scalar_time():
    schedule = get_schedule("cosine")
    data = points(12, 2, seed=10)
    x = points(6, 2, seed=11)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)

    per_row = marginal_velocity(x, t, data, schedule, batch_size=4)
    one_by_one = torch.cat([marginal_velocity(x[i : i + 1], float(t[i]), data, schedule) for i in range(6)])

    assert torch.allclose(per_row, one_by_one, rtol=1e-10, atol=1e-12)


def test_mixture_density_of_one_point_is_gaussian():
    schedule = get_schedule("linear")
    z = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x = points(10, 2, seed=12)
    t = 0.4
    alpha, beta = 0.4, 0.6

    expected = -((x - alpha * z) ** 2).sum(1) / (2 * beta**2) - 2 * math.log(beta) - math.log(2 * math.pi)

    assert torch.allclose(mixture_log_density(x, t, z, schedule), expected, atol=1e-12)


def test_mixture_density_integrates_to_one():
    schedule = get_schedule("cosine")
    data = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64)
    x = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)[:, None]

    density = mixture_log_density(x, 0.9, data, schedule).exp()

    assert torch.trapezoid(density, x[:, 0]).item() == pytest.approx(1.0, abs=1e-9)


def test_average_velocity_is_mean_velocity():
    """E[u_t(X_t)] = E[d_alpha Z + d_beta eps] = d_alpha mean(z): the tower property, within Monte Carlo error."""
    schedule = get_schedule("cosine")
    data = points(5, 2, seed=13, scale=2.0)
    generator = torch.Generator().manual_seed(14)
    n, t = 40_000, 0.6
    z = data[torch.randint(0, 5, (n,), generator=generator)]
    eps = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    values = schedule(torch.tensor(t, dtype=torch.float64))
    x_t = values.alpha * z + values.beta * eps

    velocity = marginal_velocity(x_t, t, data, schedule)
    standard_error = velocity.std(0) / math.sqrt(n)
    error = velocity.mean(0) - values.d_alpha * data.mean(0)

    assert (error.abs() / standard_error).max() < 4


def gaussian_case() -> GaussianPath:
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.5]], dtype=torch.float64)
    return GaussianPath(mean, cov, get_schedule("cosine"))


def test_monte_carlo_matches_gaussian_closed_form():
    path = gaussian_case()
    generator = torch.Generator().manual_seed(15)
    t = 0.5
    x = path.sample(8, t, generator)
    z_samples = path.sample(50_000, 1.0, generator)

    estimate = monte_carlo_velocity(x, t, z_samples, path.schedule)
    standardised = (estimate.velocity - path.velocity(x, t)) / estimate.standard_error

    assert standardised.abs().max() < 4.5
    assert estimate.effective_sample_size.min() > 1000


def test_monte_carlo_error_shrinks_like_root_m():
    path = gaussian_case()
    generator = torch.Generator().manual_seed(16)
    t = 0.5
    x = path.sample(4, t, generator)
    exact = path.velocity(x, t)

    errors = {}
    for m in (500, 50_000):
        squared = [(monte_carlo_velocity(x, t, path.sample(m, 1.0, generator), path.schedule).velocity - exact).pow(2).mean() for _ in range(20)]
        errors[m] = math.sqrt(sum(squared) / len(squared))

    ratio = errors[500] / errors[50_000]
    assert 6 < ratio < 16  # sqrt(100) = 10


def test_monte_carlo_standard_error_matches_spread():
    """The delta-method standard error predicts the spread of repeated estimates."""
    path = gaussian_case()
    generator = torch.Generator().manual_seed(17)
    t, m = 0.5, 5_000
    x = path.sample(1, t, generator)

    estimates = [monte_carlo_velocity(x, t, path.sample(m, 1.0, generator), path.schedule) for _ in range(60)]
    spread = torch.stack([e.velocity[0] for e in estimates]).std(0)
    predicted = torch.stack([e.standard_error[0] for e in estimates]).mean(0)

    assert torch.allclose(spread, predicted, rtol=0.35)


def test_posterior_mean_of_one_point_is_the_point():
    z = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    x = points(5, 2, seed=18)

    mean = posterior_mean(x, 0.5, z, get_schedule("linear"))

    assert torch.allclose(mean, z.expand(5, 2))
