"""ODE integration of ``dx/dt = u_t(x)`` with fixed-step and adaptive solvers, counting NFE.

The fixed-step solvers (explicit Runge-Kutta methods on a uniform time grid) are written
here: ``euler`` (order 1), ``midpoint`` and ``heun`` (order 2) and the classical ``rk4``
(order 4). ``dopri5`` is the adaptive Dormand-Prince 5(4) method of ``torchdiffeq``. Every
solver counts the velocity evaluations it makes (NFE), the cost measure used to compare
them. ``heun``, ``rk4`` and ``dopri5`` evaluate the velocity at the final time ``t1``;
``euler`` and ``midpoint`` never do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5")
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@dataclass(frozen=True)
class SolveResult:
    """Outcome of one integration.

    ``x``: the state at ``t1``, shape of ``x0``. ``nfe``: velocity evaluations made.
    ``times``: shape ``(k,)``, the times of ``path``: the step grid of a fixed-step
    solver, the accepted step times of ``dopri5`` (just ``(t0, t1)`` without ``record``).
    ``path``: shape ``(k, *x0.shape)``, the states at ``times``, or ``None`` without ``record``.
    ``steps``: steps taken (accepted steps for ``dopri5``), with or without ``record``.
    """

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    path: torch.Tensor | None
    steps: int = 0


class _CountingVelocity:
    """Wrap a velocity ``f(x, t)`` so that each call is counted and ``t`` arrives as a 0-d tensor of the dtype of ``x``."""

    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return self.velocity(x, t)


def steps_for_nfe(solver: str, nfe: int) -> int:
    """Return the number of steps of a fixed-step ``solver`` that spends at most ``nfe`` evaluations.

    Raises ``ValueError`` for ``dopri5`` (its NFE follows from its tolerances) and when
    ``nfe`` is below the cost of one step.
    """
    if solver not in NFE_PER_STEP:
        raise ValueError(f"steps_for_nfe needs a fixed-step solver ({', '.join(NFE_PER_STEP)}), got {solver!r}")
    steps = nfe // NFE_PER_STEP[solver]
    if steps < 1:
        raise ValueError(f"an NFE budget of {nfe} is below the {NFE_PER_STEP[solver]} evaluations of one {solver} step")
    return steps


def _euler_step(f: _CountingVelocity, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x + h * f(x, t)


def _midpoint_step(f: _CountingVelocity, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k1 = f(x, t)
    return x + h * f(x + 0.5 * h * k1, t + 0.5 * h)


def _heun_step(f: _CountingVelocity, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k1 = f(x, t)
    k2 = f(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def _rk4_step(f: _CountingVelocity, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


_FIXED_STEPS = {"euler": _euler_step, "midpoint": _midpoint_step, "heun": _heun_step, "rk4": _rk4_step}


def _integrate_fixed(f, x0, solver, steps, t0, t1, record):
    times = torch.linspace(t0, t1, steps + 1, dtype=x0.dtype, device=x0.device)
    step = _FIXED_STEPS[solver]
    x = x0
    path = [x0] if record else None
    for i in range(steps):
        # The step size comes from the grid so that the last step lands exactly on t1.
        x = step(f, x, times[i], times[i + 1] - times[i])
        if record:
            path.append(x)
    return x, times, (torch.stack(path) if record else None)


class _Dopri5Function:
    """The right-hand side ``f(t, x)`` in the form torchdiffeq calls, recording the accepted steps.

    torchdiffeq picks its first step by probing the velocity at ``t0 + h0`` for a trial
    ``h0`` that may lie past ``t1``. The time is clamped into ``[t0, t1]`` because schedules
    and conditional fields are only defined there. The probe only sizes the first step.
    """

    def __init__(self, f: _CountingVelocity, t0: float, t1: float, record: bool):
        self.f = f
        self.t_min, self.t_max = min(t0, t1), max(t0, t1)
        self.record = record
        self.accepted_steps = 0
        self.step_times: list[float] = []
        self.step_states: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.f(x, t.clamp(self.t_min, self.t_max))

    def callback_accept_step(self, t0: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor) -> None:
        self.accepted_steps += 1
        if self.record:
            self.step_times.append(float(t0))
            self.step_states.append(x0)


def _integrate_dopri5(f, x0, t0, t1, atol, rtol, record):
    if t0 == t1:
        times = torch.tensor([t0], dtype=x0.dtype, device=x0.device)
        return x0, times, (x0[None] if record else None), 0

    function = _Dopri5Function(f, t0, t1, record)
    times = torch.tensor([t0, t1], dtype=torch.float64, device=x0.device)
    # step_t makes the last step end exactly at t1, so no stage is evaluated past t1.
    options = {"step_t": times[1:]}
    states = odeint(function, x0, times, method="dopri5", atol=atol, rtol=rtol, options=options)
    x = states[-1]
    if not record:
        return x, times.to(x0.dtype), None, function.accepted_steps

    step_times = torch.tensor([*function.step_times, t1], dtype=x0.dtype, device=x0.device)
    path = torch.stack([*function.step_states, x])
    return x, step_times, path, function.accepted_steps


def integrate(
    velocity: Velocity,
    x0: torch.Tensor,
    *,
    solver: str,
    steps: int | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    record: bool = False,
) -> SolveResult:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x0`` at ``t0`` to ``t1``.

    ``velocity`` takes ``x`` of shape ``(n, ...)`` and ``t`` a 0-d tensor (dtype of ``x``)
    and returns a tensor shaped like ``x``. Fixed-step solvers take ``steps`` uniform steps
    and spend exactly ``steps * NFE_PER_STEP[solver]`` evaluations. ``dopri5`` ignores ``steps``
    and chooses its steps to meet ``atol`` and ``rtol``, which only ``dopri5`` uses. ``t0 > t1`` integrates backward in time. With ``record`` the
    result also contains the states along the way (see ``SolveResult``).

    Runs in the caller's autograd mode: wrap the call in ``torch.no_grad()`` for sampling.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; accepted: {', '.join(SOLVERS)}")
    f = _CountingVelocity(velocity)

    if solver == "dopri5":
        x, times, path, steps = _integrate_dopri5(f, x0, float(t0), float(t1), atol, rtol, record)
    else:
        if steps is None or int(steps) < 1:
            raise ValueError(f"solver {solver!r} needs steps >= 1, got {steps!r}")
        steps = int(steps)
        x, times, path = _integrate_fixed(f, x0, solver, steps, float(t0), float(t1), record)

    return SolveResult(x=x, nfe=f.calls, times=times, path=path, steps=steps)
