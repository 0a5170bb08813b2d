"""Change of schedule at sampling time, without retraining.

Two affine paths built from the same data ``z`` and noise ``eps``, a source ``A`` and a
target ``B``, visit the same points up to a scale: ``x^B_r = s_r x^A_{t_r}`` when the
signal-to-noise ratios match, ``alpha^A_{t_r} / beta^A_{t_r} = alpha^B_r / beta^B_r``, and
``s_r = beta^B_r / beta^A_{t_r} = alpha^B_r / alpha^A_{t_r}``. Differentiating in ``r``
gives the target velocity from the source velocity::

    u^B_r(x) = (ds/dr / s_r) x + s_r (dt_r/dr) u^A_{t_r}(x / s_r).

This module computes the same field in an equivalent form that needs no derivative of
``t_r`` or ``s_r``. At ``y = x / s_r`` and ``t = t_r`` the source velocity
``u = d_alpha^A z_hat + d_beta^A eps_hat`` and the position ``y = alpha^A z_hat + beta^A
eps_hat`` are two linear equations for the source's estimates ``z_hat`` and ``eps_hat``;
then ``u^B_r(x) = d_alpha^B_r z_hat + d_beta^B_r eps_hat``. The two forms agree
wherever the ratios match, and the second degrades gracefully where they cannot (below).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowmatch.paths import beta_d_beta, expand_time
from flowmatch.schedules import Schedule

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Target times are clamped into [TIME_EDGE, 1 - TIME_EDGE] because at r = 0 and r = 1 some
# coefficients are 0 / 0 (the signal-to-noise ratio is 0 or infinite). The exact target
# velocity is continuous there, so the clamp shifts it by about TIME_EDGE times its time
# derivative.
# NOTE: near the ends c_u can be large (about 1 / (2 t_r) for a polynomial source with n = 2
# near r = 0, about 1 / beta^B_r for a linear_vp or vp target near r = 1), so the errors of
# a learned source velocity are amplified there.
TIME_EDGE = 1e-6

# Halvings of [0, 1] in the bisection for t_r: 2^-64 is below the float64 spacing near 1.
BISECTION_STEPS = 64


class ScheduleChange:
    """Map a velocity learned under schedule ``source`` to the velocity of schedule ``target``.

    Times of the target are called ``r`` and times of the source ``t``. The source time
    ``t_r`` is found by bisection on the source's signal-to-noise ratio, which rises
    monotonically from ``alpha^A_0 / beta^A_0`` to infinity, in float64.

    A ``vp`` source has ``alpha^A_0 > 0`` (``alpha_0 = exp(-(beta_min + beta_max) / 4)``),
    so its ratio never falls below ``alpha^A_0 / beta^A_0``, about 0.0066 by default. For
    the default ``vp`` source the target's ratio is smaller than that for ``r`` below
    0.0042 (``cosine``), 0.0066 (``linear``, ``linear_vp``) or 0.081 (``polynomial``, n = 2).
    There the ratio is clamped to the source's range: ``t_r = 0``, ``s_r = beta^B_r /
    beta^A_0``, and the target velocity is rebuilt from the source's estimates of ``z``
    and ``eps`` at ``t = 0``. The result is then an approximation, not the exact target
    velocity.
    """

    def __init__(self, source: Schedule, target: Schedule):
        self.source = source
        self.target = target

    def source_time(self, r: torch.Tensor | float) -> torch.Tensor:
        """Return ``t_r`` (float64, shape of ``r``): the source time with the target's signal-to-noise ratio at ``r``.

        ``r`` is clamped into ``[TIME_EDGE, 1 - TIME_EDGE]`` first.
        """
        r = torch.as_tensor(r, dtype=torch.float64).clamp(TIME_EDGE, 1 - TIME_EDGE)
        target = self.target(r)
        low = torch.zeros_like(r)
        high = torch.ones_like(r)
        for _ in range(BISECTION_STEPS):
            middle = 0.5 * (low + high)
            source = self.source(middle)
            # alpha^A / beta^A < alpha^B / beta^B, multiplied out so that beta = 0 needs no division.
            below = source.alpha * target.beta < target.alpha * source.beta
            low = torch.where(below, middle, low)
            high = torch.where(below, high, middle)
        return high

    def coefficients(self, r: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``t_r``, ``s_r``, ``c_u`` and ``c_x`` (float64, shape of ``r``) with ``u^B_r(x) = c_u u^A_{t_r}(x / s_r) + c_x x``."""
        t = self.source_time(r)
        r = torch.as_tensor(r, dtype=torch.float64).clamp(TIME_EDGE, 1 - TIME_EDGE)
        source = self.source(t)
        target = self.target(r)

        # The beta ratio is exact where the ratios match and also where the source ratio is
        # clamped (t = 0); the alpha ratio avoids dividing two small betas near t = 1.
        use_beta = source.alpha <= source.beta
        s = torch.where(use_beta, target.beta / source.beta, target.alpha / source.alpha)

        # d_beta = (beta d_beta) / beta is finite because r and t_r stay below 1.
        d_beta_source = beta_d_beta(source, self.source) / source.beta
        d_beta_target = beta_d_beta(target, self.target) / target.beta
        determinant = source.d_alpha * source.beta - source.alpha * d_beta_source

        # z_hat = (beta^A u - d_beta^A y) / D and eps_hat = (d_alpha^A y - alpha^A u) / D
        # with y = x / s; the target velocity d_alpha^B z_hat + d_beta^B eps_hat is then
        # c_u u + c_x x.
        c_u = (target.d_alpha * source.beta - d_beta_target * source.alpha) / determinant
        c_y = (d_beta_target * source.d_alpha - target.d_alpha * d_beta_source) / determinant
        return t, s, c_u, c_y / s

    def velocity(self, source_velocity: Velocity) -> Velocity:
        """Return the target velocity ``f(x, r)`` built from ``source_velocity(y, t)``.

        Both take ``x`` of shape ``(n, ...)`` and a time that is a 0-d tensor (or a tensor
        of shape ``(n,)``, passed on with the same shape). The returned field calls
        ``source_velocity`` once per call, with the time ``t_r`` in the dtype of ``x``.
        """

        def target_velocity(x: torch.Tensor, r: torch.Tensor | float) -> torch.Tensor:
            t, s, c_u, c_x = self.coefficients(r)
            s, c_u, c_x = (expand_time(value, x) for value in (s, c_u, c_x))
            u = source_velocity(x / s, t.to(dtype=x.dtype, device=x.device))
            return c_u * u + c_x * x

        return target_velocity
