"""Noise schedules ``(alpha_t, beta_t)`` and their exact time derivatives.

Every schedule satisfies ``alpha_1 = 1`` and ``beta_1 = 0`` exactly. All but ``vp``
also satisfy ``alpha_0 = 0`` and ``beta_0 = 1`` exactly; ``vp`` comes from diffusion
models and only approaches them (``Schedule.alpha_0_gap`` returns the gap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("linear", "cosine", "polynomial", "linear_vp", "vp")


@dataclass(frozen=True)
class ScheduleValues:
    """Values of a schedule at times ``t``, each with the shape of ``t``."""

    alpha: torch.Tensor
    beta: torch.Tensor
    d_alpha: torch.Tensor
    d_beta: torch.Tensor


class Schedule:
    """A pair of monotone coefficients: ``alpha`` rises from 0 to 1, ``beta`` falls from 1 to 0.

    Subclasses implement ``_values`` on a float tensor ``t`` in ``[0, 1]``.
    ``variance_preserving`` is true when ``alpha_t^2 + beta_t^2 = 1`` for all ``t``.
    ``singular_at_one`` is true when ``d_beta`` is infinite at ``t = 1``, so code that
    evaluates the velocity there must stop short of it.
    """

    name: str = ""
    variance_preserving: bool = False
    singular_at_one: bool = False

    def __call__(self, t: torch.Tensor | float) -> ScheduleValues:
        t = torch.as_tensor(t, dtype=torch.get_default_dtype() if not torch.is_tensor(t) else None)
        return self._values(t)

    def _values(self, t: torch.Tensor) -> ScheduleValues:
        raise NotImplementedError

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        return self(t).alpha

    def beta(self, t: torch.Tensor | float) -> torch.Tensor:
        return self(t).beta

    @property
    def alpha_0_gap(self) -> float:
        """``alpha_0``, which is exactly 0 for every schedule except ``vp``."""
        return float(self(torch.tensor(0.0, dtype=torch.float64)).alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """``alpha = t``, ``beta = 1 - t``: straight conditional paths (rectified flow)."""

    name = "linear"

    def _values(self, t):
        one = torch.ones_like(t)
        return ScheduleValues(alpha=t, beta=1 - t, d_alpha=one, d_beta=-one)


class CosineSchedule(Schedule):
    """``alpha = sin(pi t / 2)``, ``beta = cos(pi t / 2)``: variance-preserving arcs."""

    name = "cosine"
    variance_preserving = True

    def _values(self, t):
        # cos(pi / 2) rounds to 6e-17 in float64 and -4e-8 in float32, so beta is computed
        # as sin(pi (1 - t) / 2), which is exactly 0 at t = 1 and exactly 1 at t = 0.
        alpha = torch.sin(0.5 * math.pi * t)
        beta = torch.sin(0.5 * math.pi * (1 - t))
        return ScheduleValues(alpha=alpha, beta=beta, d_alpha=0.5 * math.pi * beta, d_beta=-0.5 * math.pi * alpha)


class PolynomialSchedule(Schedule):
    """``alpha = t^n``, ``beta = 1 - t^n`` with ``n >= 1``, so that ``d_alpha`` is finite at 0."""

    name = "polynomial"

    def __init__(self, n: float = 2.0):
        if not n >= 1:
            raise ValueError(f"polynomial schedule needs n >= 1 (d_alpha = n t^(n-1) is infinite at t = 0 otherwise), got n = {n}")
        self.n = float(n)

    def _values(self, t):
        power = t**self.n
        d_power = self.n * t ** (self.n - 1)
        return ScheduleValues(alpha=power, beta=1 - power, d_alpha=d_power, d_beta=-d_power)

    def __repr__(self):
        return f"PolynomialSchedule(n={self.n:g})"


class LinearVPSchedule(Schedule):
    """``alpha = t``, ``beta = sqrt(1 - t^2)``: variance-preserving, ``d_beta`` infinite at 1."""

    name = "linear_vp"
    variance_preserving = True
    singular_at_one = True

    def _values(self, t):
        beta = torch.sqrt(torch.clamp(1 - t * t, min=0.0))
        return ScheduleValues(alpha=t, beta=beta, d_alpha=torch.ones_like(t), d_beta=-t / beta)


class VPSchedule(Schedule):
    """The variance-preserving diffusion schedule with a linear noise rate.

    With ``s = 1 - t`` (diffusion time) and noise rate ``b(s) = beta_min + s (beta_max -
    beta_min)``, ``alpha_t = exp(-T(s) / 2)`` where ``T(s) = int_0^s b``, and ``beta_t =
    sqrt(1 - alpha_t^2)``. ``alpha_0 = exp(-(beta_min + beta_max) / 4)`` is small but not
    0 (about 0.0066 for the default 0.1 and 20), and ``d_beta`` is infinite at ``t = 1``.
    """

    name = "vp"
    variance_preserving = True
    singular_at_one = True

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"vp schedule needs 0 < beta_min < beta_max, got beta_min = {beta_min}, beta_max = {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _values(self, t):
        s = 1 - t
        rate = self.beta_min + s * (self.beta_max - self.beta_min)
        integral = self.beta_min * s + 0.5 * s * s * (self.beta_max - self.beta_min)
        alpha = torch.exp(-0.5 * integral)
        # 1 - alpha^2 = -expm1(-integral) keeps beta accurate near t = 1.
        beta = torch.sqrt(-torch.expm1(-integral))
        d_alpha = 0.5 * rate * alpha
        d_beta = -alpha * d_alpha / beta
        return ScheduleValues(alpha=alpha, beta=beta, d_alpha=d_alpha, d_beta=d_beta)

    def __repr__(self):
        return f"VPSchedule(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"


def get_schedule(name: str, *, n: float = 2.0, beta_min: float = 0.1, beta_max: float = 20.0) -> Schedule:
    """Return the schedule called ``name``; ``n`` is used by ``polynomial``, ``beta_*`` by ``vp``."""
    if name == "linear":
        return LinearSchedule()
    if name == "cosine":
        return CosineSchedule()
    if name == "polynomial":
        return PolynomialSchedule(n)
    if name == "linear_vp":
        return LinearVPSchedule()
    if name == "vp":
        return VPSchedule(beta_min, beta_max)
    raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULE_NAMES)}")
