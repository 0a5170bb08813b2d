"""Exact 2-D pictures of the noising path and of the which-way arrows.

The path ``x_t = alpha_t z + beta_t eps`` is a linear combination of the data ``z``
and the noise ``eps``, so it lies in the plane they span, however many dimensions the
image has. With an orthonormal basis ``(e_1, e_2)`` of that plane (Gram-Schmidt on
``z`` then ``eps``), the coordinates ``(<x_t, e_1>, <x_t, e_2>)`` draw the path without
distortion: its component outside the plane is zero.

The which-way arrows are the conditional velocities ``u_t(x | z_i)`` at one point ``x``
and their average weighted by the posterior ``P(z_i | X_t = x)``, which is the marginal
velocity ``u_t(x)`` of the empirical distribution of the ``z_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowmatch.marginal import posterior_log_weights
from flowmatch.paths import conditional_velocity
from flowmatch.schedules import Schedule

# Relative size below which the part of eps orthogonal to z counts as zero.
PARALLEL_TOLERANCE = 1e-10


@dataclass(frozen=True)
class Plane:
    """The plane spanned by ``z`` and ``eps``, as orthonormal rows ``basis`` of shape ``(2, d)``.

    ``e_1 = z / |z|`` and ``e_2`` is the unit vector along ``eps - <eps, e_1> e_1``, so ``z``
    has coordinates ``(|z|, 0)`` and ``eps`` has a positive second coordinate.
    """

    basis: torch.Tensor

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` of shape ``(n, ...)``, flattened to ``(n, d)``, onto the plane and return shape ``(n, 2)``."""
        return _flatten(x, self.basis) @ self.basis.T

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Return the norm of the component of each ``x`` outside the plane, shape ``(n,)``."""
        flat = _flatten(x, self.basis)
        return torch.linalg.vector_norm(flat - self.coordinates(x) @ self.basis, dim=1)


def _flatten(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).to(basis.dtype)
    if flat.shape[1] != basis.shape[1]:
        raise ValueError(f"points have {flat.shape[1]} dimensions but the plane lives in {basis.shape[1]}")
    return flat


def span_plane(z: torch.Tensor, eps: torch.Tensor) -> Plane:
    """Build the orthonormal basis of the plane spanned by ``z`` and ``eps`` (any equal shapes).

    Gram-Schmidt runs twice on ``eps`` so that ``<e_1, e_2>`` is zero to rounding even when
    ``eps`` is nearly parallel to ``z``. Raises ``ValueError`` when ``z`` is zero or ``eps``
    is parallel to it, because the plane is not defined then.
    """
    z = z.reshape(-1)
    eps = eps.reshape(-1).to(z.dtype)
    if z.shape != eps.shape:
        raise ValueError(f"z has {z.numel()} entries and eps {eps.numel()}, but they must have the same shape")

    z_norm = torch.linalg.vector_norm(z)
    if z_norm == 0:
        raise ValueError("z is zero, so it does not span a direction")
    e_1 = z / z_norm

    e_2 = eps - (eps @ e_1) * e_1
    e_2 = e_2 - (e_2 @ e_1) * e_1
    e_2_norm = torch.linalg.vector_norm(e_2)
    if e_2_norm <= PARALLEL_TOLERANCE * torch.linalg.vector_norm(eps):
        raise ValueError("eps is parallel to z, so z and eps do not span a plane")
    return Plane(torch.stack([e_1, e_2 / e_2_norm]))


def path_coordinates(plane: Plane, z: torch.Tensor, eps: torch.Tensor, times: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return the plane coordinates of ``x_t = alpha_t z + beta_t eps`` for each of ``times``; shape ``(k, 2)``.

    The projection is linear, so this equals ``alpha_t P z + beta_t P eps`` and needs no
    ``(k, d)`` array of images.
    """
    z_point = plane.coordinates(z.unsqueeze(0))[0]
    eps_point = plane.coordinates(eps.unsqueeze(0))[0]
    values = schedule(times.to(plane.basis.dtype))
    return values.alpha[:, None] * z_point + values.beta[:, None] * eps_point


@dataclass(frozen=True)
class WhichWay:
    """The arrows at one point ``x`` at time ``t`` for data points ``z_1 .. z_m``.

    ``weights`` ``(m,)`` are the posteriors ``P(z_i | X_t = x)``. Row ``i`` of
    ``conditional`` ``(m, d)`` is ``u_t(x | z_i)``, and ``average`` ``(d,)`` is
    ``sum_i weights_i u_t(x | z_i)``, the marginal velocity ``u_t(x)``.
    """

    weights: torch.Tensor
    conditional: torch.Tensor
    average: torch.Tensor


def noise_reaching(x: torch.Tensor, data: torch.Tensor, t: float, schedule: Schedule) -> torch.Tensor:
    """Return the noise ``eps_i = (x - alpha_t z_i) / beta_t`` that carries each ``z_i`` to ``x`` at time ``t``.

    ``x`` has shape ``(d,)`` and ``data`` ``(m, d)``. Raises ``ValueError`` when ``beta_t = 0``.
    """
    values = schedule(torch.tensor(t, dtype=data.dtype))
    if not values.beta > 0:
        raise ValueError(f"beta_t must be positive to invert the path, got beta_t = {float(values.beta)} at t = {t}")
    return (x[None, :] - values.alpha * data) / values.beta


def which_way_arrows(x: torch.Tensor, data: torch.Tensor, t: float, schedule: Schedule) -> WhichWay:
    """Compute the conditional velocities at ``x`` (shape ``(d,)``) towards each row of ``data`` and their posterior average."""
    eps = noise_reaching(x, data, t, schedule)
    conditional = conditional_velocity(data, eps, t, schedule)
    weights = posterior_log_weights(x[None, :], t, data, schedule)[0].exp()
    return WhichWay(weights=weights, conditional=conditional, average=weights @ conditional)


def conditional_path(x: torch.Tensor, z: torch.Tensor, t: float, times: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return the path from noise to ``z`` that passes through ``x`` at time ``t``, at each of ``times``; shape ``(k, d)``.

    Its tangent at ``t`` is ``u_t(x | z)``. Under the linear schedule it is the straight
    line through ``x`` and ``z``, and under the others it is curved.
    """
    eps = noise_reaching(x, z[None, :], t, schedule)[0]
    values = schedule(times.to(z.dtype))
    return values.alpha[:, None] * z + values.beta[:, None] * eps
