"""Log-likelihood of a flow through the instantaneous change of variables.

Along a trajectory of ``dx/dt = u_t(x)`` the log-density obeys ``d/dt log p_t(x_t) =
-div u_t(x_t)``. Integrating the pair ``(x_t, l_t)`` with ``dl/dt = div u_t(x_t)`` backward
from ``x_1`` (data, ``t = 1``, ``l_1 = 0``) to ``t = 0`` gives

    log p_1(x_1) = log p_0(x_0) + l_0 = log p_0(x_0) - int_0^1 div u_t(x_t) dt,

with ``p_0 = N(0, I)`` unless the caller passes another base density.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flowmatch.solvers import Velocity, integrate

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def standard_normal_log_density(x: torch.Tensor) -> torch.Tensor:
    """Return ``log N(x; 0, I)`` in nats, shape ``(n,)``, for ``x`` of shape ``(n, ...)``."""
    flat = x.flatten(1)
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def divergence_exact(velocity: Velocity, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``u_t(x)`` and its exact divergence, shape ``(n,)``, with one backward pass per dimension.

    Rows of ``x`` (shape ``(n, ...)``) must not interact in ``velocity`` (no batch
    statistics), because the divergence of every row is read from one summed gradient.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = velocity(x, t)
        flat_u = u.flatten(1)
        dim = flat_u.shape[1]
        divergence = torch.zeros(x.shape[0], dtype=u.dtype, device=u.device)
        for i in range(dim):
            (gradient,) = torch.autograd.grad(flat_u[:, i].sum(), x, retain_graph=i < dim - 1)
            divergence = divergence + gradient.flatten(1)[:, i]
    return u.detach(), divergence.detach()


def draw_probes(shape: torch.Size, n_probes: int, kind: str, generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """Draw ``n_probes`` Hutchinson probes of ``shape`` with zero mean and identity covariance, shape ``(n_probes, *shape)``.

    ``kind`` is ``rademacher`` (entries +1 or -1) or ``gaussian`` (standard normal entries).
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; accepted: {', '.join(PROBES)}")
    size = (n_probes, *shape)
    if kind == "gaussian":
        return torch.randn(size, generator=generator, dtype=dtype, device=device)
    bits = torch.randint(0, 2, size, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def divergence_hutchinson(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``u_t(x)`` and per-probe estimates ``v^T (du/dx) v`` of its divergence, shape ``(n_probes, n)``.

    ``probes`` has shape ``(n_probes, *x.shape)``; with zero-mean, identity-covariance
    probes each estimate is unbiased, and their mean over probes is the estimate used.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = velocity(x, t)
        estimates = []
        for k, probe in enumerate(probes):
            (gradient,) = torch.autograd.grad((u * probe).sum(), x, retain_graph=k < len(probes) - 1)
            estimates.append((gradient * probe).flatten(1).sum(1))
    return u.detach(), torch.stack(estimates).detach()


def log_likelihood(
    velocity: Velocity,
    x1: torch.Tensor,
    *,
    solver: str = "dopri5",
    steps: int | None = None,
    divergence: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    t1: float = 1.0,
    log_p0: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return ``log p_1(x1)`` in nats, shape ``(n,)``, for points ``x1`` of shape ``(n, ...)``.

    Integrates from ``t1`` back to ``t = 0`` with ``solver`` (and ``steps``, or ``atol`` and
    ``rtol`` for ``dopri5``; see ``flowmatch.solvers.integrate``). ``divergence`` is
    ``exact`` (one backward pass per dimension, for low dimension) or ``hutchinson``. The
    Hutchinson estimator draws ``n_probes`` probes of kind ``probe`` once from ``generator``
    and keeps them for the whole trajectory. The integrand is then smooth in ``t``, and the
    estimate of the log-density is unbiased. ``log_p0`` is the log-density at ``t = 0`` (default ``N(0, I)``; the ``vp``
    schedule starts only close to it).

    ``t1 < 1`` starts at ``1 - delta`` for a velocity that is singular at ``t = 1`` and then
    returns ``log p_{t1}(x1)``, the density of the path at ``t1``, which approaches
    ``log p_1`` as ``t1 -> 1``. The state ``[x, l]`` is integrated as one tensor, so
    ``dopri5``'s tolerances apply to the log-density too.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; accepted: {', '.join(DIVERGENCES)}")
    if divergence == "hutchinson" and n_probes < 1:
        raise ValueError(f"hutchinson divergence needs n_probes >= 1, got {n_probes}")
    log_p0 = standard_normal_log_density if log_p0 is None else log_p0

    shape = x1.shape
    dim = x1[0].numel()
    probes = None
    if divergence == "hutchinson":
        probes = draw_probes(shape, n_probes, probe, generator, x1.dtype, x1.device)

    def augmented_velocity(state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = state[:, :dim].reshape(shape)
        if probes is None:
            u, div = divergence_exact(velocity, x, t)
        else:
            u, estimates = divergence_hutchinson(velocity, x, t, probes)
            div = estimates.mean(0)
        return torch.cat([u.flatten(1), div[:, None]], dim=1)

    state1 = torch.cat([x1.flatten(1), torch.zeros_like(x1.flatten(1)[:, :1])], dim=1)
    result = integrate(augmented_velocity, state1, solver=solver, steps=steps, t0=t1, t1=0.0, atol=atol, rtol=rtol)
    x0 = result.x[:, :dim].reshape(shape)
    return log_p0(x0) + result.x[:, dim]
