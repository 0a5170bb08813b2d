"""A finite-difference check of the continuity equation ``d p_t / dt + div(p_t u_t) = 0``.

For a finite data set ``{z_i}`` the marginal density ``p_t`` is the mixture of
``N(alpha_t z_i, beta_t^2 I)`` in closed form and ``u_t`` is the exact marginal
velocity. Central differences of step ``h`` in ``t`` and in each coordinate of ``x``
approximate both terms with an error of order ``h^2``, so the residual of the sum
shrinks like ``h^2`` when ``u_t`` is the velocity that transports ``p_t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowmatch.marginal import marginal_velocity, mixture_log_density
from flowmatch.schedules import Schedule


def mixture_density(x: torch.Tensor, t: float, data: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return ``p_t(x)``, shape ``(n,)``, of the mixture of ``N(alpha_t z_i, beta_t^2 I)`` over ``data`` (m, d)."""
    return mixture_log_density(x, t, data, schedule).exp()


def probability_flux(x: torch.Tensor, t: float, data: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return the flux ``p_t(x) u_t(x)``, shape ``(n, d)``."""
    return mixture_density(x, t, data, schedule)[:, None] * marginal_velocity(x, t, data, schedule)


@dataclass(frozen=True)
class ContinuityTerms:
    """Both terms of the continuity equation at ``n`` points, each of shape ``(n,)``."""

    d_p_dt: torch.Tensor
    div_flux: torch.Tensor

    @property
    def residual(self) -> torch.Tensor:
        return self.d_p_dt + self.div_flux

    def relative_residual(self) -> float:
        """Return ``max |residual|`` divided by the larger of ``max |d_p_dt|`` and ``max |div_flux|``."""
        scale = max(float(self.d_p_dt.abs().max()), float(self.div_flux.abs().max()))
        return float(self.residual.abs().max()) / scale


def continuity_terms(x: torch.Tensor, t: float, data: torch.Tensor, schedule: Schedule, h: float) -> ContinuityTerms:
    """Approximate ``d p_t / dt`` and ``div(p_t u_t)`` at ``x`` (n, d) by central differences of step ``h``.

    Needs ``h < t < 1 - h`` so that both time offsets lie inside ``(0, 1)``.
    """
    if not 0 < h < t < 1 - h:
        raise ValueError(f"central differences need 0 < h < t < 1 - h, got t = {t}, h = {h}")

    d_p_dt = (mixture_density(x, t + h, data, schedule) - mixture_density(x, t - h, data, schedule)) / (2 * h)

    div_flux = torch.zeros_like(d_p_dt)
    for k in range(x.shape[1]):
        step = torch.zeros_like(x[0])
        step[k] = h
        forward = probability_flux(x + step, t, data, schedule)[:, k]
        backward = probability_flux(x - step, t, data, schedule)[:, k]
        div_flux = div_flux + (forward - backward) / (2 * h)

    return ContinuityTerms(d_p_dt=d_p_dt, div_flux=div_flux)


def grid_points(low: float, high: float, h: float, dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return the points of a regular grid on ``[low, high]^dim``, shape ``(k^dim, dim)``.

    The spacing is ``(high - low) / (k - 1)`` with ``k - 1 = round((high - low) / h)``, so it
    equals ``h`` when ``h`` divides the interval.
    """
    count = int(round((high - low) / h)) + 1
    axis = torch.linspace(low, high, count, dtype=dtype)
    mesh = torch.meshgrid(*([axis] * dim), indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)
