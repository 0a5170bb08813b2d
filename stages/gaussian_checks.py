"""Checks of the ODE solvers and of the log-likelihood on the closed-form Gaussian flow.

Part of the ``marginal_flow`` stage. For data ``N(mean, cov)`` with ``cov`` positive
definite, the marginal velocity and its flow map are known exactly
(``flowmatch.gaussian.GaussianPath``) and smooth on all of ``[0, 1]``, so they serve as a
reference for two numerical claims:

- solver orders: ``ORDER_N`` draws of ``N(0, I)`` are carried to ``t = 1`` in float64 by
  each fixed-step solver with each step count of ``ORDER_STEPS``. The fitted order is minus
  the least-squares slope of the log RMS endpoint error (distance to the exact flow map)
  against log steps; Euler, midpoint, Heun and RK4 should give 1, 2, 2 and 4. The orders
  are measured under the fixed ``REFERENCE_SCHEDULE`` (cosine), so the check reads the
  same in every experiment, and again under the study's schedule. A schedule can raise a
  measured order above its textbook value. Under the ``linear`` and ``linear_vp``
  schedules ``v(t) = alpha_t^2 lam + beta_t^2`` is a quadratic polynomial in ``t`` for
  every eigenvalue ``lam`` of ``cov``. The ``h^2`` term of the midpoint rule's global error
  on this flow then integrates to zero, so midpoint measures order 3;
- likelihood: ``flowmatch.likelihood.log_likelihood`` with the closed-form velocity
  (exact divergence, dopri5 with atol = rtol = ``LIKELIHOOD_TOLERANCE``, float64) against
  the analytic ``log N(x; mean, cov)`` on up to ``LIKELIHOOD_N`` held-out points of the
  study's Gaussian; and the Hutchinson estimate (``HUTCHINSON_PROBES`` Rademacher probes)
  on ``HUTCHINSON_N`` points of a ``HUTCHINSON_DIM``-dimensional Gaussian, in standard
  errors. Because the Jacobian of the Gaussian velocity does not depend on ``x``, a probe
  ``v`` kept along the trajectory estimates ``int_0^1 div u_t dt = tr M`` by ``v^T M v`` with
  ``M = Q diag(log sqrt(v_i(1) / v_i(0))) Q^T``. Its variance for Rademacher probes is
  ``2 sum_{i != j} M_ij^2`` per probe, which gives the exact standard error.
"""

from __future__ import annotations

import logging
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from flowmatch.datasets import random_gaussian  # noqa: E402
from flowmatch.gaussian import GaussianPath  # noqa: E402
from flowmatch.likelihood import log_likelihood  # noqa: E402
from flowmatch.schedules import Schedule  # noqa: E402
from flowmatch.solvers import NFE_PER_STEP, integrate  # noqa: E402
from stages.common import StageError  # noqa: E402

log = logging.getLogger("flowmatch.marginal_flow")

REFERENCE_SCHEDULE = "cosine"
ORDER_SOLVERS = tuple(NFE_PER_STEP)
EXPECTED_ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
# Fitted from 16 steps on, every order is within 0.3 of its asymptotic value under every
# schedule (measured on the default 2-D Gaussian), and RK4's error at 256 steps (about
# 1e-10 under cosine) stays well above float64 rounding.
ORDER_STEPS = (16, 32, 64, 128, 256)
ORDER_N = 256
# A point counts towards a fitted order only if its error is above this level, because
# below it float64 rounding, not the discretisation, sets the error.
ROUNDING_FLOOR = 1e-12

LIKELIHOOD_N = 256
LIKELIHOOD_TOLERANCE = 1e-10
HUTCHINSON_DIM = 16
HUTCHINSON_PROBES = 8
HUTCHINSON_N = 128


# --- solver orders -------------------------------------------------------------------


def fitted_order(steps: list[int], errors: list[float]) -> float | None:
    """Return minus the least-squares slope of ``log error`` against ``log steps``, or ``None``.

    Only points with an error above ``ROUNDING_FLOOR`` count; with fewer than two the
    order cannot be measured (a solver that is exact for the flow).
    """
    points = [(s, e) for s, e in zip(steps, errors, strict=True) if e > ROUNDING_FLOOR]
    if len(points) < 2:
        return None
    slope = np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0]
    return float(-slope)


def solver_errors(path: GaussianPath, x0: torch.Tensor, role: str) -> list[dict]:
    """Return one record per fixed-step solver and step count: RMS distance of ``x_1`` to the exact flow map of ``x0``."""
    exact = path.flow(x0, 1.0)
    records = []
    for solver in ORDER_SOLVERS:
        for steps in ORDER_STEPS:
            result = integrate(path.velocity, x0, solver=solver, steps=steps)
            if not torch.isfinite(result.x).all():
                raise StageError(f"solver {solver} with {steps} steps produced non-finite values on the Gaussian flow under schedule {path.schedule!r}")
            error = float((result.x - exact).pow(2).sum(1).mean().sqrt())
            records.append({"role": role, "schedule": path.schedule.name, "solver": solver, "steps": steps, "nfe": result.nfe, "error": error})
    return records


def orders_of(records: list[dict]) -> dict[str, float]:
    """Return the fitted order per solver of ``records`` (one schedule), leaving out solvers without one."""
    orders = {}
    for solver in ORDER_SOLVERS:
        rows = [r for r in records if r["solver"] == solver]
        order = fitted_order([r["steps"] for r in rows], [r["error"] for r in rows])
        if order is not None:
            orders[solver] = order
    return orders


def check_solver_orders(mean: torch.Tensor, cov: torch.Tensor, reference: Schedule, study: Schedule, generator: torch.Generator) -> tuple[dict, list[dict]]:
    """Measure the convergence order of every fixed-step solver under the reference and the study schedule.

    Returns the metrics ``solver_order`` (reference), ``solver_order_study`` and
    ``solver_order_schedules`` (the two schedule names), and the error records.
    """
    x0 = torch.randn(ORDER_N, mean.shape[0], dtype=torch.float64, generator=generator)
    reference_records = solver_errors(GaussianPath(mean, cov, reference), x0, "reference")
    study_records = solver_errors(GaussianPath(mean, cov, study), x0, "study")
    metrics = {
        "solver_order": orders_of(reference_records),
        "solver_order_study": orders_of(study_records),
        "solver_order_schedules": {"reference": reference.name, "study": study.name},
    }
    return metrics, reference_records + study_records


# --- likelihood ----------------------------------------------------------------------


def start_log_density(path: GaussianPath):
    """Return ``log p_0`` of ``path``, or ``None`` for the default ``N(0, I)`` when ``alpha_0 = 0``.

    Under the ``vp`` schedule ``p_0 = N(alpha_0 mean, alpha_0^2 cov + beta_0^2 I)``, the
    path's own marginal at ``t = 0``.
    """
    if path.schedule.alpha_0_gap == 0.0:
        return None
    return lambda x: path.log_density(x, 0.0)


def analytic_log_density(mean: torch.Tensor, cov: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``log N(x; mean, cov)`` in nats, shape ``(n,)``."""
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


def hutchinson_standard_error(path: GaussianPath, n_probes: int) -> float:
    """Return the standard error of the Hutchinson log-likelihood with ``n_probes`` Rademacher probes (see the module docstring)."""
    values = path.schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))
    variance = values.alpha[:, None] ** 2 * path.eigenvalues + values.beta[:, None] ** 2
    rate = 0.5 * torch.log(variance[1] / variance[0])
    m = (path.eigenvectors * rate) @ path.eigenvectors.T
    off_diagonal = m - torch.diag(torch.diagonal(m))
    return math.sqrt(2.0 * float(off_diagonal.pow(2).sum()) / n_probes)


def check_likelihood(mean: torch.Tensor, cov: torch.Tensor, points: torch.Tensor, schedule: Schedule, rng: np.random.Generator, generator: torch.Generator) -> tuple[dict, dict]:
    """Compare computed log-likelihoods with the closed form, exactly in the data's dimension and by Hutchinson in ``HUTCHINSON_DIM``.

    Returns the metrics (``likelihood_error_max`` and ``hutchinson_z`` at the top level,
    the details under ``likelihood``) and the per-point values for the figure.
    """
    path = GaussianPath(mean, cov, schedule)
    exact = analytic_log_density(mean, cov, points)
    computed = log_likelihood(path.velocity, points, solver="dopri5", atol=LIKELIHOOD_TOLERANCE, rtol=LIKELIHOOD_TOLERANCE, log_p0=start_log_density(path))
    error = (computed - exact).abs()
    if not torch.isfinite(error).all():
        raise StageError(f"the log-likelihood of the closed-form Gaussian flow is not finite under schedule {schedule!r}")

    mean_h, cov_h = (torch.as_tensor(a, dtype=torch.float64) for a in random_gaussian(HUTCHINSON_DIM, rng))
    path_h = GaussianPath(mean_h, cov_h, schedule)
    x_h = path_h.sample(HUTCHINSON_N, 1.0, generator)
    exact_h = analytic_log_density(mean_h, cov_h, x_h)
    estimate_h = log_likelihood(
        path_h.velocity, x_h, solver="dopri5", atol=LIKELIHOOD_TOLERANCE, rtol=LIKELIHOOD_TOLERANCE,
        divergence="hutchinson", n_probes=HUTCHINSON_PROBES, generator=generator, log_p0=start_log_density(path_h),
    )
    standard_error = hutchinson_standard_error(path_h, HUTCHINSON_PROBES)
    z = (estimate_h - exact_h) / standard_error

    metrics = {
        "likelihood_error_max": float(error.max()),
        "hutchinson_z": float(z.abs().max()),
        "likelihood": {
            "n_points": points.shape[0],
            "dim": points.shape[1],
            "tolerance": LIKELIHOOD_TOLERANCE,
            "error_rms": float(error.pow(2).mean().sqrt()),
            "hutchinson_dim": HUTCHINSON_DIM,
            "hutchinson_probes": HUTCHINSON_PROBES,
            "n_hutchinson_points": HUTCHINSON_N,
            "hutchinson_standard_error": standard_error,
            "hutchinson_z_rms": float(z.pow(2).mean().sqrt()),
            "hutchinson_z_mean": float(z.mean()),
        },
    }
    values = {"exact": exact, "error": error, "z": z}
    return metrics, values


# --- figures -------------------------------------------------------------------------


def plot_solver_convergence(records: list[dict], metrics: dict):
    """Plot endpoint error against steps per solver, one panel per schedule (one in all when both are the same), with the fitted orders."""
    roles = [("reference", "solver_order"), ("study", "solver_order_study")]
    schedules = metrics["solver_order_schedules"]
    if schedules["study"] == schedules["reference"]:
        roles = roles[:1]
    fig, axes = plt.subplots(1, len(roles), figsize=(6 * len(roles) + 1, 4.8), constrained_layout=True, sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (role, key) in zip(axes, roles, strict=True):
        rows = [r for r in records if r["role"] == role]
        for i, solver in enumerate(ORDER_SOLVERS):
            mine = [r for r in rows if r["solver"] == solver]
            order = metrics[key].get(solver)
            label = f"{solver}: order {order:.2f} (expected {EXPECTED_ORDER[solver]})" if order is not None else f"{solver}: exact"
            ax.plot([r["steps"] for r in mine], [max(r["error"], 1e-16) for r in mine], "os^D"[i] + "-", color=f"C{i}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ORDER_STEPS, labels=[str(steps) for steps in ORDER_STEPS], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        same = " (also the study's)" if len(roles) == 1 else ""
        ax.set(yscale="log", xlabel="steps", title=f"{role} schedule: {rows[0]['schedule']}{same}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("RMS distance of x_1 to the exact flow map")
    fig.suptitle("fixed-step solvers on the closed-form Gaussian flow from N(0, I), float64")
    return fig


def plot_likelihood(values: dict, metrics: dict, schedule: Schedule):
    """Plot the per-point error of the exact-divergence log-likelihood and the histogram of Hutchinson z-scores."""
    fig, (ax_error, ax_z) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    details = metrics["likelihood"]
    ax_error.scatter(values["exact"].numpy(), values["error"].clamp_min(1e-16).numpy(), s=8, color="C0")
    ax_error.set(yscale="log", xlabel="analytic log N(x; mean, cov) (nats)", ylabel="|computed - analytic| (nats)")
    ax_error.set_title(f"exact divergence, {details['dim']}-D, dopri5 atol = rtol = {details['tolerance']:g}: max {metrics['likelihood_error_max']:.2g} nats", fontsize=10)
    ax_error.grid(True, which="major", alpha=0.3)

    z = values["z"].numpy()
    edge = max(4.0, float(np.abs(z).max()) + 0.5)
    grid = np.linspace(-edge, edge, 200)
    ax_z.hist(z, bins=np.linspace(-edge, edge, 33), density=True, color="C1", alpha=0.7, label=f"{len(z)} points")
    ax_z.plot(grid, np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi), color="k", label="N(0, 1)")
    ax_z.set(xlabel="(Hutchinson estimate - analytic) / standard error", ylabel="density")
    ax_z.set_title(f"Hutchinson, {details['hutchinson_dim']}-D, {details['hutchinson_probes']} probes: max |z| {metrics['hutchinson_z']:.2f}, RMS {details['hutchinson_z_rms']:.2f}", fontsize=10)
    ax_z.legend(fontsize=8)
    fig.suptitle(f"log-likelihood of the closed-form Gaussian flow against log N(x; mean, cov), {schedule.name} schedule")
    return fig
