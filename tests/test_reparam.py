import itertools
import math

import pytest
import torch

from flowmatch.gaussian import GaussianPath
from flowmatch.reparam import TIME_EDGE, ScheduleChange
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule
from flowmatch.solvers import integrate

MEAN = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
_FACTOR = torch.tensor([[1.0, 0.3, 0.0], [0.2, 0.5, 0.1], [0.0, 0.4, 0.3]], dtype=torch.float64)
COV = _FACTOR @ _FACTOR.T
PAIRS = list(itertools.product(SCHEDULE_NAMES, repeat=2))
PAIR_IDS = [f"{source}-to-{target}" for source, target in PAIRS]
# Every target time here has a signal-to-noise ratio above the vp source's minimum
# (about 0.0066), which the polynomial target reaches only at r = 0.08.
TIMES = [0.1, 0.3, 0.5, 0.7, 0.9]


def _relative_error(estimate, reference):
    """Largest per-point error, relative to the root-mean-square norm of the reference."""
    scale = reference.norm(dim=1).pow(2).mean().sqrt()
    return ((estimate - reference).norm(dim=1).max() / scale).item()


@pytest.mark.parametrize("source, target", PAIRS, ids=PAIR_IDS)
def test_velocity_matches_target_closed_form(source, target):
    source_path = GaussianPath(MEAN, COV, get_schedule(source))
    target_path = GaussianPath(MEAN, COV, get_schedule(target))
    velocity = ScheduleChange(source_path.schedule, target_path.schedule).velocity(source_path.velocity)
    generator = torch.Generator().manual_seed(0)
    for r in TIMES:
        x = target_path.sample(256, r, generator)
        error = _relative_error(velocity(x, torch.tensor(r, dtype=torch.float64)), target_path.velocity(x, r))
        assert error < 1e-4, f"{source} -> {target} at r = {r}: relative error {error:.2e}"


@pytest.mark.parametrize("source, target", PAIRS, ids=PAIR_IDS)
def test_signal_to_noise_ratios_match(source, target):
    change = ScheduleChange(get_schedule(source), get_schedule(target))
    r = torch.tensor(TIMES, dtype=torch.float64)
    t = change.source_time(r)
    source_values, target_values = change.source(t), change.target(r)
    torch.testing.assert_close(source_values.alpha / source_values.beta, target_values.alpha / target_values.beta, rtol=1e-12, atol=0)


@pytest.mark.parametrize("source, target", PAIRS, ids=PAIR_IDS)
def test_scale_matches_both_ratios(source, target):
    change = ScheduleChange(get_schedule(source), get_schedule(target))
    r = torch.tensor(TIMES, dtype=torch.float64)
    t, s, _, _ = change.coefficients(r)
    source_values, target_values = change.source(t), change.target(r)
    torch.testing.assert_close(s, target_values.alpha / source_values.alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(s, target_values.beta / source_values.beta, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_same_schedule_is_identity(name):
    schedule = get_schedule(name)
    change = ScheduleChange(schedule, schedule)
    r = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    t, s, c_u, c_x = change.coefficients(r)
    torch.testing.assert_close(t, r, rtol=0, atol=1e-14)
    torch.testing.assert_close(s, torch.ones_like(r), rtol=0, atol=1e-12)
    torch.testing.assert_close(c_u, torch.ones_like(r), rtol=0, atol=1e-10)
    torch.testing.assert_close(c_x, torch.zeros_like(r), rtol=0, atol=1e-8)


def test_linear_to_cosine_time_closed_form():
    # t / (1 - t) = tan(pi r / 2) gives t_r = sin / (sin + cos) of the angle pi r / 2.
    change = ScheduleChange(get_schedule("linear"), get_schedule("cosine"))
    r = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    angle = 0.5 * math.pi * r.clamp(TIME_EDGE, 1 - TIME_EDGE)
    expected = torch.sin(angle) / (torch.sin(angle) + torch.cos(angle))
    torch.testing.assert_close(change.source_time(r), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("source, target", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_endpoints(source, target, dtype):
    source_path = GaussianPath(MEAN, COV, get_schedule(source))
    velocity = ScheduleChange(get_schedule(source), get_schedule(target)).velocity(source_path.velocity)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    for r in [0.0, 1.0]:
        u = velocity(x, torch.tensor(r, dtype=dtype))
        assert u.dtype == dtype
        assert torch.isfinite(u).all()


def test_per_row_times():
    source_path = GaussianPath(MEAN, COV, get_schedule("linear"))
    target_path = GaussianPath(MEAN, COV, get_schedule("vp"))
    velocity = ScheduleChange(source_path.schedule, target_path.schedule).velocity(source_path.velocity)
    r = torch.tensor(TIMES, dtype=torch.float64)
    x = torch.randn(len(TIMES), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(velocity(x, r), target_path.velocity(x, r), rtol=1e-9, atol=1e-9)


def test_vp_source_ratio_clamped_near_zero():
    change = ScheduleChange(get_schedule("vp"), get_schedule("linear"))
    source_0 = change.source(torch.tensor(0.0, dtype=torch.float64))
    ratio_0 = (source_0.alpha / source_0.beta).item()
    below, above = 0.5 * ratio_0, 2 * ratio_0
    # The linear schedule has ratio r / (1 - r), so r = ratio / (1 + ratio).
    t = change.source_time(torch.tensor([below / (1 + below), above / (1 + above)], dtype=torch.float64))
    assert t[0].item() < 1e-15
    assert t[1].item() > 0.01


def test_sampling_keeps_noise_to_data_map():
    # Paths that start from the same noise (alpha_0 = 0) are one path run at another
    # speed, so the target ODE carries each x0 to the same point as the source ODE.
    source_path = GaussianPath(MEAN, COV, get_schedule("linear"))
    velocity = ScheduleChange(source_path.schedule, get_schedule("cosine")).velocity(source_path.velocity)
    x0 = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = integrate(velocity, x0, solver="dopri5", atol=1e-9, rtol=1e-9)
    assert (result.x - source_path.flow(x0, 1.0)).abs().max().item() < 1e-5
