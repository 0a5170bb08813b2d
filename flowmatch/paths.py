"""The affine noising path ``x_t = alpha_t z + beta_t eps`` and its conditional velocity."""

from __future__ import annotations

import torch

from flowmatch.schedules import Schedule, ScheduleValues


def expand_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Return ``t`` shaped to broadcast against ``like`` of shape ``(n, ...)``.

    ``t`` is a scalar or a tensor of shape ``(n,)``; the result has shape ``(n, 1, ..., 1)``
    (or is a 0-d tensor) with the dtype and device of ``like``.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def sample_x_t(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float, schedule: Schedule) -> torch.Tensor:
    """Return ``x_t = alpha_t z + beta_t eps`` for data ``z`` and noise ``eps`` of shape ``(n, ...)``."""
    values = schedule(expand_time(t, z))
    return values.alpha * z + values.beta * eps


def conditional_velocity(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float, schedule: Schedule) -> torch.Tensor:
    """Return ``u_t(x_t | z) = d_alpha_t z + d_beta_t eps``, the time derivative of ``x_t``.

    This is the regression target of conditional flow matching.
    """
    values = schedule(expand_time(t, z))
    return values.d_alpha * z + values.d_beta * eps


def beta_d_beta(values: ScheduleValues, schedule: Schedule) -> torch.Tensor:
    """Return ``beta_t * d_beta_t``, finite on all of ``[0, 1]``.

    For a variance-preserving schedule it is computed as ``-alpha_t d_alpha_t`` (the
    derivative of ``alpha_t^2 + beta_t^2 = 1``), which stays finite at ``t = 1`` where
    ``d_beta`` is infinite for ``linear_vp`` and ``vp``.
    """
    if schedule.variance_preserving:
        return -values.alpha * values.d_alpha
    if schedule.singular_at_one:
        raise NotImplementedError(f"{schedule!r}: beta * d_beta at t = 1 is only known for variance-preserving schedules")
    return values.beta * values.d_beta


def conditional_velocity_x(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float, schedule: Schedule) -> torch.Tensor:
    """Return ``u_t(x | z) = (d_alpha_t - alpha_t r_t) z + r_t x`` with the rate ``r_t = d_beta_t / beta_t``.

    This is the conditional velocity as a field over positions ``x`` of shape ``(n, ...)``
    for one data point ``z`` of the same shape (or broadcastable to it), with ``t`` in
    ``[0, 1]`` a scalar or of shape ``(n,)``. On the path ``x = alpha_t z + beta_t eps``
    it equals ``d_alpha_t z + d_beta_t eps``.

    The rate is computed as ``beta_t d_beta_t / beta_t^2`` (see ``beta_d_beta``), so it is
    exact and finite wherever ``beta_t > 0``. At ``t = 1``, where ``beta_1 = 0`` and the
    field is ``0 / 0`` at ``x = z`` and infinite elsewhere, the rate is set to 0 and the
    field takes the value ``d_alpha_1 z``: its limit along the noise-free path
    ``x = alpha_t z``. No step size is built into the field, so the exact flow still
    ends on ``z``. This has two consequences for solvers. The field is stiff near
    ``t = 1`` (the rate grows like ``1 / (1 - t)``), so ``dopri5`` takes many short steps
    there. Solvers that evaluate at ``t = 1`` (Heun, RK4) see the limit value instead of
    the true velocity ``d_alpha_1 z + d_beta_1 eps``, which leaves an error of order ``h``
    in their last step of size ``h``.
    """
    values = schedule(expand_time(t, x))
    beta_squared = values.beta**2
    positive = beta_squared > 0
    safe_beta_squared = torch.where(positive, beta_squared, torch.ones_like(beta_squared))
    rate = torch.where(positive, beta_d_beta(values, schedule) / safe_beta_squared, torch.zeros_like(beta_squared))
    return values.d_alpha * z + rate * (x - values.alpha * z)
