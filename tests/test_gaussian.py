import math

import pytest
import torch

from flowmatch.gaussian import GaussianPath
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule

MEAN = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
_FACTOR = torch.tensor([[1.0, 0.3, 0.0], [0.2, 0.5, 0.1], [0.0, 0.4, 0.3]], dtype=torch.float64)
COV = _FACTOR @ _FACTOR.T
TIMES = [0.0, 0.05, 0.3, 0.5, 0.8, 0.97, 1.0]
INTERIOR_TIMES = [0.05, 0.3, 0.5, 0.8, 0.97]


@pytest.fixture(params=SCHEDULE_NAMES)
def path(request):
    return GaussianPath(MEAN, COV, get_schedule(request.param))


def _points(n=100, seed=0):
    return 2 * torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _coefficients(path, t):
    values = path.schedule(torch.tensor(t, dtype=torch.float64))
    return values.alpha, values.beta, values.d_alpha, values.d_beta


@pytest.mark.parametrize("t", TIMES)
def test_moments_closed_form(path, t):
    alpha, beta, _, _ = _coefficients(path, t)
    torch.testing.assert_close(path.mean_t(t), alpha * MEAN)
    torch.testing.assert_close(path.cov_t(t), alpha**2 * COV + beta**2 * torch.eye(3, dtype=torch.float64))


def test_moments_match_samples_of_x_t(path):
    generator = torch.Generator().manual_seed(1)
    n = 40000
    z = MEAN + torch.randn(n, 3, dtype=torch.float64, generator=generator) @ torch.linalg.cholesky(COV).T
    eps = torch.randn(n, 3, dtype=torch.float64, generator=generator)
    alpha, beta, _, _ = _coefficients(path, 0.5)
    x_t = alpha * z + beta * eps
    # Standard errors of a mean and of a covariance entry are below 3 / sqrt(n) = 0.015 here.
    torch.testing.assert_close(x_t.mean(0), path.mean_t(0.5), rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(x_t.T), path.cov_t(0.5), rtol=0, atol=0.05)


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_velocity_is_posterior_mean(path, t):
    # u_t(x) = d_alpha E[z | x] + d_beta E[eps | x], by Gaussian conditioning without the eigenbasis.
    alpha, beta, d_alpha, d_beta = _coefficients(path, t)
    x = _points()
    cov_t = alpha**2 * COV + beta**2 * torch.eye(3, dtype=torch.float64)
    whitened = torch.linalg.solve(cov_t, (x - alpha * MEAN).T).T
    z_mean = MEAN + alpha * whitened @ COV
    eps_mean = beta * whitened
    torch.testing.assert_close(path.velocity(x, t), d_alpha * z_mean + d_beta * eps_mean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_log_density_matches_torch(path, t):
    x = _points()
    reference = torch.distributions.MultivariateNormal(path.mean_t(t), path.cov_t(t)).log_prob(x)
    torch.testing.assert_close(path.log_density(x, t), reference, rtol=1e-10, atol=1e-10)


def test_log_density_at_one_is_data_density(path):
    x = _points()
    reference = torch.distributions.MultivariateNormal(MEAN, COV).log_prob(x)
    torch.testing.assert_close(path.log_density(x, 1.0), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_continuity_equation(path, t):
    # d/dt log p_t(x) + div u_t(x) + u_t(x) . grad log p_t(x) = 0 for the exact pair (p_t, u_t).
    x = _points(20).requires_grad_(True)
    h = 1e-6
    d_log_p = (path.log_density(x, t + h) - path.log_density(x, t - h)).detach() / (2 * h)
    (grad_log_p,) = torch.autograd.grad(path.log_density(x, t).sum(), x)
    u = path.velocity(x, t)
    divergence = sum(torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(3))
    residual = d_log_p + divergence + (u * grad_log_p).sum(1)
    # d log p / dt reaches several hundred at points far from a narrow p_t, so the
    # central difference error is bounded relative to it.
    assert (residual.abs() / (1 + d_log_p.abs())).max().item() < 1e-6


def test_flow_starts_at_x0(path):
    x0 = _points()
    torch.testing.assert_close(path.flow(x0, 0.0), x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_flow_solves_ode(path, t):
    x0 = _points()
    h = 1e-6
    derivative = (path.flow(x0, t + h) - path.flow(x0, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, path.velocity(path.flow(x0, t), t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", TIMES)
def test_flow_pushes_marginals(path, t):
    # The flow map is affine: x0 -> M x0 + b, so it carries N(m_0, C_0) to N(M m_0 + b, M C_0 M^T).
    b = path.flow(torch.zeros(1, 3, dtype=torch.float64), t)[0]
    matrix = path.flow(torch.eye(3, dtype=torch.float64), t).T - b[:, None]
    torch.testing.assert_close(matrix @ path.mean_t(0.0) + b, path.mean_t(t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(matrix @ path.cov_t(0.0) @ matrix.T, path.cov_t(t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", TIMES)
def test_finite_everywhere(path, t):
    x = _points()
    assert torch.isfinite(path.velocity(x, t)).all()
    assert torch.isfinite(path.log_density(x, t)).all()
    assert torch.isfinite(path.flow(x, t)).all()


def test_degenerate_cov_finite_before_one(path):
    rank_one = torch.outer(MEAN, MEAN) / MEAN.dot(MEAN)
    degenerate = GaussianPath(MEAN, rank_one, path.schedule)
    x = _points()
    for t in [0.0, 0.5, 0.999]:
        assert torch.isfinite(degenerate.velocity(x, t)).all()
        assert torch.isfinite(degenerate.log_density(x, t)).all()


def test_per_row_times_match_scalar(path):
    x = _points(len(TIMES))
    t = torch.tensor(TIMES, dtype=torch.float64)
    rows = [path.velocity(x[i : i + 1], time)[0] for i, time in enumerate(TIMES)]
    torch.testing.assert_close(path.velocity(x, t), torch.stack(rows))
    log_rows = [path.log_density(x[i : i + 1], time)[0] for i, time in enumerate(TIMES)]
    torch.testing.assert_close(path.log_density(x, t), torch.stack(log_rows))


def test_float32_input_keeps_dtype(path):
    x = _points().float()
    assert path.velocity(x, torch.tensor(0.5)).dtype == torch.float32
    assert path.log_density(x, 0.5).dtype == torch.float32
    assert path.flow(x, 0.5).dtype == torch.float32


def test_standard_data_static_under_vp():
    # Data N(0, I) under a variance-preserving schedule gives X_t ~ N(0, I) for all t.
    for name in ["cosine", "linear_vp", "vp"]:
        path = GaussianPath(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), get_schedule(name))
        x = _points()[:, :2]
        for t in TIMES:
            torch.testing.assert_close(path.velocity(x, t), torch.zeros_like(x), rtol=0, atol=1e-12)


def test_sample_moments(path):
    samples = path.sample(40000, 0.3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(samples.mean(0), path.mean_t(0.3), rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(samples.T), path.cov_t(0.3), rtol=0, atol=0.05)


def test_rejects_bad_inputs():
    schedule = get_schedule("linear")
    with pytest.raises(ValueError, match="symmetric"):
        GaussianPath(MEAN, COV + torch.triu(torch.ones(3, 3, dtype=torch.float64), 1), schedule)
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianPath(MEAN, -COV, schedule)
    with pytest.raises(ValueError, match="shape"):
        GaussianPath(MEAN, COV[:2, :2], schedule)
    with pytest.raises(ValueError, match="shape"):
        GaussianPath(MEAN, COV, schedule).velocity(torch.zeros(4, 2), 0.5)


def test_one_dimensional_density_normalised():
    path = GaussianPath(torch.tensor([0.7]), torch.tensor([[0.25]]), get_schedule("cosine"))
    grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)[:, None]
    for t in [0.0, 0.5, 1.0]:
        mass = torch.trapezoid(path.log_density(grid, t).exp(), grid[:, 0]).item()
        assert mass == pytest.approx(1.0, abs=1e-9)
    assert path.log_density(torch.tensor([[0.7]], dtype=torch.float64), 1.0).item() == pytest.approx(-math.log(0.5 * math.sqrt(2 * math.pi)))
