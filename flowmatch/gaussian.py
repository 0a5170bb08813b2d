"""Closed forms for Gaussian data ``z ~ N(mean, cov)``.

With ``x_t = alpha_t z + beta_t eps`` the marginal is ``X_t ~ N(alpha_t mean, alpha_t^2 cov +
beta_t^2 I)``. Write ``cov = Q diag(lam) Q^T`` and ``y = Q^T (x - alpha_t mean)``. Each
coordinate of ``y`` has variance ``v_i(t) = alpha_t^2 lam_i + beta_t^2``, and the marginal
velocity ``u_t(x) = E[d_alpha_t z + d_beta_t eps | X_t = x]`` is affine in ``x``::

    u_t(x) = d_alpha_t mean + Q diag(a_t) Q^T (x - alpha_t mean),
    a_i(t) = (alpha_t d_alpha_t lam_i + beta_t d_beta_t) / v_i(t) = d/dt log sqrt(v_i(t)).

Its flow scales each coordinate of ``y`` by ``sqrt(v_i(t) / v_i(0))``. Everything here is
finite for ``t`` in ``[0, 1)``, and also at ``t = 1`` when ``cov`` is positive definite
(``v_i(1) = lam_i``), for every schedule, because ``beta_t d_beta_t`` is finite at ``t = 1``.
"""

from __future__ import annotations

import math

import torch

from flowmatch.paths import beta_d_beta
from flowmatch.schedules import Schedule


class GaussianPath:
    """The marginal path, velocity and flow of the affine path for data ``N(mean, cov)``.

    ``mean`` has shape ``(d,)`` and ``cov`` shape ``(d, d)``, symmetric positive
    semi-definite. Computations run in float64 and results take the dtype of the input
    ``x`` (or float64 for ``mean_t`` and ``cov_t``). Times ``t`` are floats, 0-d tensors,
    or, where noted, tensors of shape ``(n,)`` with one time per row of ``x``.
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, schedule: Schedule):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) to match mean, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError("cov must be symmetric")

        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        scale = max(float(eigenvalues.abs().max()), 1.0)
        if float(eigenvalues.min()) < -1e-10 * scale:
            raise ValueError(f"cov must be positive semi-definite, smallest eigenvalue {float(eigenvalues.min()):.3g}")

        self.mean = mean
        self.cov = cov
        self.schedule = schedule
        self.dim = d
        self.eigenvalues = eigenvalues.clamp(min=0.0)
        self.eigenvectors = eigenvectors

    def _coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``alpha_t``, ``d_alpha_t`` of shape ``t.shape + (1,)`` and ``v(t)``, ``a(t)`` of shape ``t.shape + (d,)``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or have shape (n,), got {tuple(t.shape)}")
        values = self.schedule(t)
        alpha = values.alpha[..., None]
        d_alpha = values.d_alpha[..., None]
        beta = values.beta[..., None]
        g = beta_d_beta(values, self.schedule)[..., None]

        variance = alpha**2 * self.eigenvalues + beta**2
        rate = (alpha * d_alpha * self.eigenvalues + g) / variance
        return alpha, d_alpha, variance, rate

    def _to_eigenbasis(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {tuple(x.shape)}")
        return (x.to(torch.float64) - alpha * self.mean) @ self.eigenvectors

    def mean_t(self, t: torch.Tensor | float) -> torch.Tensor:
        """Return the marginal mean ``alpha_t mean``, shape ``(d,)``, for a scalar ``t``."""
        alpha = self.schedule(torch.as_tensor(t, dtype=torch.float64)).alpha
        return alpha * self.mean

    def cov_t(self, t: torch.Tensor | float) -> torch.Tensor:
        """Return the marginal covariance ``alpha_t^2 cov + beta_t^2 I``, shape ``(d, d)``, for a scalar ``t``."""
        _, _, variance, _ = self._coefficients(t)
        return (self.eigenvectors * variance) @ self.eigenvectors.T

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Return the exact marginal velocity ``u_t(x)``, shape ``(n, d)``, for ``x`` of shape ``(n, d)``.

        ``t`` is a scalar or has shape ``(n,)``.
        """
        alpha, d_alpha, _, rate = self._coefficients(t)
        y = self._to_eigenbasis(x, alpha)
        u = d_alpha * self.mean + (rate * y) @ self.eigenvectors.T
        return u.to(x.dtype)

    def log_density(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Return ``log p_t(x)`` in nats, shape ``(n,)``, for ``x`` of shape ``(n, d)``.

        ``t`` is a scalar or has shape ``(n,)``.
        """
        alpha, _, variance, _ = self._coefficients(t)
        y = self._to_eigenbasis(x, alpha)
        quadratic = (y**2 / variance).sum(-1)
        log_det = torch.log(variance).sum(-1)
        log_p = -0.5 * (quadratic + log_det + self.dim * math.log(2 * math.pi))
        return log_p.to(x.dtype)

    def flow(self, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Return ``x_t``, shape ``(n, d)``: the exact solution of ``dx/dt = u_t(x)`` started at ``x0`` at ``t = 0``.

        ``x0`` has shape ``(n, d)`` and is any start point (for the ``vp`` schedule the
        marginal at ``t = 0`` is only close to ``N(0, I)``). ``t`` is a scalar or has shape ``(n,)``.
        """
        alpha_0, _, variance_0, _ = self._coefficients(0.0)
        alpha, _, variance, _ = self._coefficients(t)
        y0 = self._to_eigenbasis(x0, alpha_0)
        y = torch.sqrt(variance / variance_0) * y0
        x = alpha * self.mean + y @ self.eigenvectors.T
        return x.to(x0.dtype)

    def sample(self, n: int, t: torch.Tensor | float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples of ``X_t ~ N(alpha_t mean, alpha_t^2 cov + beta_t^2 I)``, float64, shape ``(n, d)``."""
        alpha, _, variance, _ = self._coefficients(t)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return alpha * self.mean + (noise * torch.sqrt(variance)) @ self.eigenvectors.T
