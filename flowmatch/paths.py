"""The affine noising path ``x_t = alpha_t z + beta_t eps`` and its conditional velocity."""

from __future__ import annotations

import torch

from flowmatch.schedules import Schedule


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
