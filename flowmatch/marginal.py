"""The marginal velocity: the posterior-weighted average of conditional velocities.

For a finite data set ``{z_i}``, i = 1..m, with equal prior weights, ``X_t = x`` has
posterior ``P(z_i | X_t = x) = softmax_i(log N(x; alpha_t z_i, beta_t^2 I))``, the
marginal density is the mixture ``p_t(x) = (1/m) sum_i N(x; alpha_t z_i, beta_t^2 I)``
and the marginal velocity is ``u_t(x) = sum_i P(z_i | X_t = x) u_t(x | z_i)``.

Because ``u_t(x | z) = d_alpha z + d_beta (x - alpha z) / beta`` is affine in ``z``, the
average only needs the posterior mean ``E[Z | X_t = x]``. The same formula with ``m``
samples of ``z`` drawn from a data distribution is the self-normalised Monte Carlo
estimate of that distribution's marginal velocity (``monte_carlo_velocity``).

Every function takes ``x`` of shape ``(n, d)``, ``data`` of shape ``(m, d)`` and ``t`` a
float, a 0-d tensor or a tensor of shape ``(n,)``. It works on ``x`` in chunks of
``batch_size`` rows, so that the ``(chunk, m, d)`` differences bound the memory.

At ``t = 1`` (``beta_1 = 0``) the posterior and the velocity take their limits as in
``flowmatch.paths.conditional_velocity_x``: the posterior puts all its weight on the
nearest ``alpha_1 z_i`` (split equally between ties), and the rate ``d_beta / beta``
is set to 0, so ``u_1(x) = d_alpha_1 E[Z | X_1 = x]``. Solvers that evaluate at
``t = 1`` therefore stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowmatch.paths import beta_d_beta, expand_time
from flowmatch.schedules import Schedule

# Rows of x per chunk: the (chunk, m, d) differences then hold about 2^22 numbers.
_CHUNK_ELEMENTS = 2**22


def _chunk_rows(m: int, d: int, batch_size: int | None) -> int:
    if batch_size is not None:
        return max(1, batch_size)
    return max(1, _CHUNK_ELEMENTS // max(1, m * d))


def _in_chunks(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor, rows: int) -> torch.Tensor:
    """Apply ``function(x_chunk, t_chunk)`` to chunks of ``rows`` rows and concatenate the results."""
    if x.shape[0] <= rows:
        return function(x, t)
    outputs = []
    for start in range(0, x.shape[0], rows):
        t_chunk = t if t.ndim == 0 else t[start : start + rows]
        outputs.append(function(x[start : start + rows], t_chunk))
    return torch.cat(outputs)


def _coefficients(t: torch.Tensor, x: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, ...]:
    """Return ``alpha, beta, d_alpha`` and the rate ``d_beta / beta`` at ``t``, each of shape ``(n, 1)`` or ``(1, 1)``.

    The rate is ``beta d_beta / beta^2`` (finite for every schedule while ``beta > 0``)
    and 0 where ``beta = 0``.
    """
    values = schedule(expand_time(t, x))
    beta_squared = values.beta**2
    positive = beta_squared > 0
    safe = torch.where(positive, beta_squared, torch.ones_like(beta_squared))
    rate = torch.where(positive, beta_d_beta(values, schedule) / safe, torch.zeros_like(beta_squared))
    return tuple(v.reshape(-1, 1) for v in (values.alpha, values.beta, values.d_alpha, rate))


def _gaussian_log_terms(x: torch.Tensor, t: torch.Tensor, data: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return ``-|x - alpha_t z_i|^2 / (2 beta_t^2)``, shape ``(n, m)``, without normalising constants.

    Rows with ``beta_t = 0`` get their limit up to a constant: 0 at the nearest
    ``alpha_t z_i`` and ``-inf`` elsewhere.
    """
    alpha, beta, _, _ = _coefficients(t, x, schedule)
    # Distances come from explicit differences: |x|^2 - 2 x.z + |z|^2 would cancel, and
    # the error, divided by beta^2, would swamp the weights near t = 1.
    if t.ndim == 0:
        squared = torch.cdist(x, alpha * data, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    else:
        squared = ((x[:, None, :] - alpha[:, :, None] * data[None, :, :]) ** 2).sum(-1)
    positive = beta > 0
    scaled = -0.5 * squared / torch.where(positive, beta, torch.ones_like(beta)) ** 2
    if bool(positive.all()):
        return scaled
    nearest = squared == squared.min(dim=1, keepdim=True).values
    limit = torch.where(nearest, torch.zeros_like(squared), torch.full_like(squared, -math.inf))
    return torch.where(positive, scaled, limit)


def posterior_log_weights(x: torch.Tensor, t: torch.Tensor | float, data: torch.Tensor, schedule: Schedule, batch_size: int | None = None) -> torch.Tensor:
    """Return ``log P(z_i | X_t = x)``, shape ``(n, m)``, for ``x`` of shape ``(n, d)`` and ``data`` ``(m, d)``.

    Computed as a log-softmax of Gaussian log-likelihoods, so it stays finite however
    small ``beta_t`` is, as long as ``beta_t > 0``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)

    def chunk(x_chunk, t_chunk):
        return torch.log_softmax(_gaussian_log_terms(x_chunk, t_chunk, data, schedule), dim=1)

    return _in_chunks(chunk, x, t, _chunk_rows(data.shape[0], data.shape[1], batch_size))


def posterior_mean(x: torch.Tensor, t: torch.Tensor | float, data: torch.Tensor, schedule: Schedule, batch_size: int | None = None) -> torch.Tensor:
    """Return the posterior mean ``E[Z | X_t = x] = sum_i P(z_i | X_t = x) z_i``, shape ``(n, d)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)

    def chunk(x_chunk, t_chunk):
        weights = torch.softmax(_gaussian_log_terms(x_chunk, t_chunk, data, schedule), dim=1)
        return weights @ data

    return _in_chunks(chunk, x, t, _chunk_rows(data.shape[0], data.shape[1], batch_size))


def velocity_from_posterior_mean(x: torch.Tensor, t: torch.Tensor | float, mean_z: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return ``d_alpha m + (d_beta / beta) (x - alpha m)`` for the posterior mean ``m`` of shape ``(n, d)``.

    This is the posterior average of ``u_t(x | z)``, which is affine in ``z``. The rate
    ``d_beta / beta`` is taken as 0 at ``t = 1``.
    """
    alpha, _, d_alpha, rate = _coefficients(torch.as_tensor(t, dtype=x.dtype, device=x.device), x, schedule)
    return d_alpha * mean_z + rate * (x - alpha * mean_z)


def marginal_velocity(x: torch.Tensor, t: torch.Tensor | float, data: torch.Tensor, schedule: Schedule, batch_size: int | None = None) -> torch.Tensor:
    """Return ``u_t(x)``, shape ``(n, d)``, for the empirical distribution of ``data`` (m, d).

    Exact for ``t < 1``; at ``t = 1`` it is the limit described in the module docstring.
    """
    mean_z = posterior_mean(x, t, data, schedule, batch_size)
    return velocity_from_posterior_mean(x, t, mean_z, schedule)


def mixture_log_density(x: torch.Tensor, t: torch.Tensor | float, data: torch.Tensor, schedule: Schedule, batch_size: int | None = None) -> torch.Tensor:
    """Return ``log p_t(x)`` of the mixture ``(1/m) sum_i N(alpha_t z_i, beta_t^2 I)``, shape ``(n,)``.

    Needs ``beta_t > 0``, so ``t < 1``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    m, d = data.shape

    def chunk(x_chunk, t_chunk):
        _, beta, _, _ = _coefficients(t_chunk, x_chunk, schedule)
        log_norm = -d * (torch.log(beta.reshape(-1)) + 0.5 * math.log(2 * math.pi))
        return torch.logsumexp(_gaussian_log_terms(x_chunk, t_chunk, data, schedule), dim=1) - math.log(m) + log_norm

    return _in_chunks(chunk, x, t, _chunk_rows(m, d, batch_size))


@dataclass(frozen=True)
class MonteCarloVelocity:
    """A self-normalised Monte Carlo estimate of ``u_t(x)`` at ``n`` points ``x`` in ``d`` dimensions.

    ``velocity`` (n, d) is the estimate, ``standard_error`` (n, d) its delta-method
    standard error per coordinate, ``effective_sample_size`` (n,) is ``1 / sum_j w_j^2``
    for the normalised weights ``w_j``.
    """

    velocity: torch.Tensor
    standard_error: torch.Tensor
    effective_sample_size: torch.Tensor


def monte_carlo_velocity(x: torch.Tensor, t: torch.Tensor | float, z_samples: torch.Tensor, schedule: Schedule, batch_size: int | None = None) -> MonteCarloVelocity:
    """Estimate ``u_t(x) = E[u_t(x | Z) | X_t = x]`` from ``m`` samples ``z_samples`` (m, d) of the data distribution.

    The estimate is ``sum_j w_j u_t(x | z_j)`` with self-normalised weights ``w_j``
    proportional to ``N(x; alpha_t z_j, beta_t^2 I)``. Its variance for large ``m`` is
    ``sum_j w_j^2 (u_t(x | z_j) - estimate)^2``, and since ``u_t(x | z_j) - estimate =
    (d_alpha - alpha d_beta / beta)(z_j - E_w[z])``, the standard error only needs the
    weighted spread of ``z``. The estimator's bias is of order ``1 / m``, below its
    standard error of order ``1 / sqrt(m)`` once ``m`` is large. Needs ``t < 1``: at
    ``t = 1`` one sample takes all the weight and the standard error is 0.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)

    def chunk(x_chunk, t_chunk):
        weights = torch.softmax(_gaussian_log_terms(x_chunk, t_chunk, z_samples, schedule), dim=1)
        mean_z = weights @ z_samples
        spread = ((weights**2)[:, :, None] * (z_samples[None, :, :] - mean_z[:, None, :]) ** 2).sum(1)
        ess = 1.0 / (weights**2).sum(1)
        return torch.cat([mean_z, spread, ess[:, None]], dim=1)

    packed = _in_chunks(chunk, x, t, _chunk_rows(z_samples.shape[0], z_samples.shape[1], batch_size))
    d = x.shape[1]
    mean_z, spread, ess = packed[:, :d], packed[:, d : 2 * d], packed[:, 2 * d]

    alpha, _, d_alpha, rate = _coefficients(t, x, schedule)
    z_coefficient = d_alpha - alpha * rate
    return MonteCarloVelocity(
        velocity=velocity_from_posterior_mean(x, t, mean_z, schedule),
        standard_error=z_coefficient.abs() * spread.sqrt(),
        effective_sample_size=ess,
    )
