"""The marginal velocity: the posterior-weighted average of conditional velocities.

For a finite data set ``{z_i}`` with equal prior weights, ``X_t = x`` has posterior
``P(z_i | X_t = x) = softmax_i(log N(x; alpha_t z_i, beta_t^2 I))`` and the marginal
velocity is ``u_t(x) = sum_i P(z_i | X_t = x) u_t(x | z_i)``.
"""

from __future__ import annotations

import torch

from flowmatch.paths import expand_time
from flowmatch.schedules import Schedule


def posterior_log_weights(x: torch.Tensor, t: torch.Tensor | float, data: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return ``log P(z_i | X_t = x)``, shape ``(n, m)``, for ``x`` of shape ``(n, d)`` and ``data`` ``(m, d)``.

    Computed as a log-softmax of Gaussian log-likelihoods, so it stays finite however
    small ``beta_t`` is, as long as ``beta_t > 0``.
    """
    values = schedule(expand_time(t, x))
    alpha = values.alpha.reshape(-1, 1)
    beta = values.beta.reshape(-1, 1)
    squared = ((x[:, None, :] - alpha[:, :, None] * data[None, :, :]) ** 2).sum(-1)
    return torch.log_softmax(-0.5 * squared / beta**2, dim=1)


def marginal_velocity(x: torch.Tensor, t: torch.Tensor | float, data: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return ``u_t(x)`` for the empirical distribution of ``data``, shape of ``x`` ``(n, d)``.

    Uses ``u_t(x | z) = d_alpha z + d_beta (x - alpha z) / beta``, so ``beta_t`` must be
    positive (``t < 1``).
    """
    weights = posterior_log_weights(x, t, data, schedule).exp()
    values = schedule(expand_time(t, x))
    alpha, beta = values.alpha.reshape(-1, 1), values.beta.reshape(-1, 1)
    d_alpha, d_beta = values.d_alpha.reshape(-1, 1), values.d_beta.reshape(-1, 1)
    mean_z = weights @ data
    return d_alpha * mean_z + d_beta * (x - alpha * mean_z) / beta
