import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmatch.schedules import (
    SCHEDULE_NAMES,
    LinearVPSchedule,
    PolynomialSchedule,
    VPSchedule,
    get_schedule,
)

SCHEDULES = {
    "linear": get_schedule("linear"),
    "cosine": get_schedule("cosine"),
    "polynomial_n1": get_schedule("polynomial", n=1.0),
    "polynomial_n2": get_schedule("polynomial", n=2.0),
    "polynomial_n3.5": get_schedule("polynomial", n=3.5),
    "linear_vp": get_schedule("linear_vp"),
    "vp": get_schedule("vp"),
    "vp_mild": get_schedule("vp", beta_min=0.5, beta_max=5.0),
}
EXACT_ENDPOINTS = [key for key, schedule in SCHEDULES.items() if schedule.name != "vp"]
INTERIOR = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)[1:-1]


@pytest.fixture(params=list(SCHEDULES), ids=list(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]


def test_every_name_is_covered():
    assert {schedule.name for schedule in SCHEDULES.values()} == set(SCHEDULE_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", EXACT_ENDPOINTS)
def test_endpoints_exact(key, dtype):
    values = SCHEDULES[key](torch.tensor([0.0, 1.0], dtype=dtype))
    assert values.alpha.tolist() == [0.0, 1.0]
    assert values.beta.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", ["vp", "vp_mild"])
def test_vp_endpoints_approximate(key, dtype):
    schedule = SCHEDULES[key]
    alpha_0 = math.exp(-(schedule.beta_min + schedule.beta_max) / 4)
    values = schedule(torch.tensor([0.0, 1.0], dtype=dtype))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14

    assert values.alpha[0].item() == pytest.approx(alpha_0, rel=tolerance)
    assert values.beta[0].item() == pytest.approx(math.sqrt(1 - alpha_0**2), rel=tolerance)
    assert values.alpha[1].item() == 1.0
    assert values.beta[1].item() == 0.0
    assert schedule.alpha_0_gap == pytest.approx(alpha_0, rel=1e-14)


def test_vp_default_alpha_0_small_not_zero():
    gap = SCHEDULES["vp"].alpha_0_gap
    assert 0 < gap < 0.01


@pytest.mark.parametrize("key", EXACT_ENDPOINTS)
def test_alpha_0_gap_zero(key):
    assert SCHEDULES[key].alpha_0_gap == 0.0


def test_monotone_on_grid(schedule):
    grid = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    values = schedule(grid)
    assert (values.alpha.diff() > 0).all()
    assert (values.beta.diff() < 0).all()


def test_derivative_signs(schedule):
    values = schedule(INTERIOR)
    assert (values.d_alpha > 0).all()
    assert (values.d_beta < 0).all()


@settings(max_examples=50, deadline=None)
@given(a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_monotone_any_pair(a, b):
    low, high = min(a, b), max(a, b)
    for schedule in SCHEDULES.values():
        values = schedule(torch.tensor([low, high], dtype=torch.float64))
        assert values.alpha[0] <= values.alpha[1]
        assert values.beta[0] >= values.beta[1]


def test_derivatives_match_autograd(schedule):
    t = INTERIOR.clone().requires_grad_(True)
    values = schedule(t)
    (d_alpha,) = torch.autograd.grad(values.alpha.sum(), t, retain_graph=True)
    (d_beta,) = torch.autograd.grad(values.beta.sum(), t)
    torch.testing.assert_close(values.d_alpha.detach(), d_alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(values.d_beta.detach(), d_beta, rtol=1e-10, atol=1e-12)


def test_derivatives_match_finite_differences(schedule):
    h = 1e-6
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    values = schedule(t)
    d_alpha = (schedule(t + h).alpha - schedule(t - h).alpha) / (2 * h)
    d_beta = (schedule(t + h).beta - schedule(t - h).beta) / (2 * h)
    torch.testing.assert_close(values.d_alpha, d_alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(values.d_beta, d_beta, rtol=1e-6, atol=1e-8)


def test_variance_preserving_identity(schedule):
    grid = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    values = schedule(grid)
    total = values.alpha**2 + values.beta**2
    if schedule.variance_preserving:
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    else:
        assert total[500].item() < 1 - 1e-3


def test_variance_preserving_flags():
    flags = {name: get_schedule(name).variance_preserving for name in SCHEDULE_NAMES}
    assert flags == {"linear": False, "cosine": True, "polynomial": False, "linear_vp": True, "vp": True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_finite_on_closed_interval(schedule, dtype):
    values = schedule(torch.linspace(0.0, 1.0, 1001, dtype=dtype))
    assert torch.isfinite(values.alpha).all()
    assert torch.isfinite(values.beta).all()
    assert torch.isfinite(values.d_alpha).all()
    assert torch.isfinite(values.d_beta[:-1]).all()


def test_d_beta_at_one_infinite_only_if_singular(schedule):
    d_beta_1 = schedule(torch.tensor(1.0, dtype=torch.float64)).d_beta
    if schedule.singular_at_one:
        assert d_beta_1.item() == -math.inf
    else:
        assert math.isfinite(d_beta_1.item())


def test_singular_flags():
    flags = {name: get_schedule(name).singular_at_one for name in SCHEDULE_NAMES}
    assert flags == {"linear": False, "cosine": False, "polynomial": False, "linear_vp": True, "vp": True}


def test_values_keep_dtype_and_shape(schedule):
    t = torch.rand(3, 4, dtype=torch.float32)
    values = schedule(t)
    for field in (values.alpha, values.beta, values.d_alpha, values.d_beta):
        assert field.shape == (3, 4)
        assert field.dtype == torch.float32


def test_python_float_time_accepted(schedule):
    values = schedule(0.5)
    assert values.alpha.ndim == 0
    assert 0 < values.alpha.item() < 1


@pytest.mark.parametrize("n", [0.0, 0.5, 0.999, -1.0, math.nan])
def test_polynomial_rejects_n_below_one(n):
    with pytest.raises(ValueError, match="n >= 1"):
        PolynomialSchedule(n)
    with pytest.raises(ValueError, match="n >= 1"):
        get_schedule("polynomial", n=n)


@pytest.mark.parametrize("beta_min, beta_max", [(20.0, 0.1), (1.0, 1.0), (0.0, 20.0), (-0.1, 20.0), (math.nan, 20.0)])
def test_vp_rejects_bad_beta_range(beta_min, beta_max):
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSchedule(beta_min, beta_max)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        get_schedule("vp", beta_min=beta_min, beta_max=beta_max)


def test_unknown_name_rejected():
    with pytest.raises(ValueError, match="accepted: linear, cosine"):
        get_schedule("sigmoid")


def test_linear_vp_closed_form():
    t = torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64)
    values = LinearVPSchedule()(t)
    torch.testing.assert_close(values.beta, torch.tensor([1.0, 0.8, 0.0], dtype=torch.float64))
    torch.testing.assert_close(values.d_beta[1], torch.tensor(-0.75, dtype=torch.float64))
