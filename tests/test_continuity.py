"""The continuity equation for Gaussian mixtures: residual small and shrinking like h^2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmatch.continuity import ContinuityTerms, continuity_terms, grid_points, mixture_density, probability_flux
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule

MIXTURES = {
    1: torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64),
    2: torch.tensor([[-1.0, -1.0], [1.5, 0.0], [0.0, 1.5]], dtype=torch.float64),
}
SPACINGS = (0.1, 0.05, 0.025)


def residuals(name: str, dim: int, t: float) -> list[float]:
    schedule = get_schedule(name)
    return [continuity_terms(grid_points(-3.0, 3.0, h, dim), t, MIXTURES[dim], schedule, h).relative_residual() for h in SPACINGS]


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_residual_is_small(name, dim):
    assert residuals(name, dim, 0.5)[-1] < 0.02


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", ["linear", "cosine", "vp"])
def test_residual_converges_at_order_two(name, dim):
    values = residuals(name, dim, 0.5)
    order = np.polyfit(np.log(SPACINGS), np.log(values), 1)[0]

    assert values[0] > values[1] > values[2]
    assert 1.7 < order < 2.3


def test_wrong_velocity_leaves_large_residual():
    schedule = get_schedule("cosine")
    data = MIXTURES[1]
    h, t = 0.0125, 0.5
    x = grid_points(-3.0, 3.0, h, 1)
    good = continuity_terms(x, t, data, schedule, h)

    # Doubling the velocity doubles the flux, so d p/dt and div(p u) no longer cancel.
    doubled = ContinuityTerms(d_p_dt=good.d_p_dt, div_flux=2 * good.div_flux)

    assert good.relative_residual() < 1e-2
    assert doubled.relative_residual() > 0.4


def test_flux_is_density_times_velocity_for_one_point():
    schedule = get_schedule("linear")
    z = torch.tensor([[1.0]], dtype=torch.float64)
    x = torch.tensor([[0.0], [0.5], [1.5]], dtype=torch.float64)
    t = 0.5
    density = torch.exp(-((x[:, 0] - 0.5) ** 2) / (2 * 0.25)) / math.sqrt(2 * math.pi * 0.25)
    velocity = (z[0, 0] - x[:, 0]) / (1 - t)

    assert torch.allclose(mixture_density(x, t, z, schedule), density)
    assert torch.allclose(probability_flux(x, t, z, schedule)[:, 0], density * velocity)


def test_grid_points_cover_square():
    grid = grid_points(-1.0, 1.0, 0.5, 2)

    assert grid.shape == (25, 2)
    assert grid.min().item() == -1.0
    assert grid.max().item() == 1.0
    assert torch.allclose(torch.unique(grid[:, 0]), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(("t", "h"), [(0.05, 0.1), (0.95, 0.1), (0.5, 0.0)])
def test_time_outside_range_is_rejected(t, h):
    with pytest.raises(ValueError, match="central differences"):
        continuity_terms(grid_points(-1.0, 1.0, 0.5, 1), t, MIXTURES[1], get_schedule("linear"), h)
