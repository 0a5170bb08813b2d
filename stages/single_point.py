"""Stage `single_point`: check the single-data-point mathematics numerically.

For one data point ``z`` in ``d`` dimensions (norm ``single_point.z_norm``, direction
drawn with ``seed``):

- moments: ``n_samples`` draws of ``X_t = alpha_t z + beta_t eps`` at each ``t`` of
  ``t_grid`` against ``N(alpha_t z, beta_t^2 I)``. Errors are given in standard errors:
  the mean error of coordinate ``k`` over ``beta_t / sqrt(n)``, a covariance entry's
  error over its Gaussian standard error (``sqrt(2 / n) beta_t^2`` on the diagonal,
  ``beta_t^2 / sqrt(n)`` off it), so values of a few mean statistical noise;
- endpoints: ``n_endpoints`` draws of ``N(0, I)`` carried by the conditional velocity in
  its ``x`` form (``flowmatch.paths.conditional_velocity_x``) with every solver. Reported:
  the root-mean-square distance to ``z`` against the number of steps (fixed-step
  solvers) or the tolerance (dopri5), and the fitted convergence order;
- trajectories: ``n_trajectories`` noise draws converging onto ``z``.

The ``x`` form is singular at ``t = 1`` (``beta_1 = 0``), where ``conditional_velocity_x``
returns its limit along the noise-free path. The stage refuses non-finite endpoints.

Writes reports/metrics/single_point.json, reports/plots/single_point_convergence.csv,
reports/plots/single_point_moments.csv and the figures moments.png, convergence.png and
trajectories.png under reports/figures/single_point/.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flowmatch.paths import conditional_velocity_x, sample_x_t  # noqa: E402
from flowmatch.schedules import Schedule  # noqa: E402
from flowmatch.solvers import integrate  # noqa: E402
from stages.common import StageError, run_stage, save_figure, write_csv, write_json  # noqa: E402
from stages.config import SinglePointParams, load_params  # noqa: E402

log = logging.getLogger("flowmatch.single_point")

FIGURE_DIR = Path("reports/figures/single_point")
METRICS_PATH = Path("reports/metrics/single_point.json")
CONVERGENCE_CSV = Path("reports/plots/single_point_convergence.csv")
MOMENTS_CSV = Path("reports/plots/single_point_moments.csv")

# Independent random streams, so that changing one sample size leaves the other draws alone.
STREAM_Z, STREAM_MOMENTS, STREAM_ENDPOINTS, STREAM_TRAJECTORIES = range(4)

# A point counts towards a fitted convergence order only if its error is above this
# level, because below it float64 rounding, not the discretisation, sets the error.
ROUNDING_FLOOR = 1e-12


def make_generator(seed: int, stream: int) -> torch.Generator:
    """Return a generator for one random stream of the stage, derived from ``seed``."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def draw_z(d: int, z_norm: float, generator: torch.Generator) -> torch.Tensor:
    """Return ``z`` of shape ``(d,)``: norm ``z_norm``, direction uniform on the sphere."""
    direction = torch.randn(d, dtype=torch.float64, generator=generator)
    return z_norm * direction / direction.norm()


# --- moments -------------------------------------------------------------------------


def moment_errors(z: torch.Tensor, t: float, n: int, schedule: Schedule, generator: torch.Generator) -> dict:
    """Compare ``n`` draws of ``X_t`` with ``N(alpha_t z, beta_t^2 I)``, with errors in standard errors.

    Returns the maximum and the sum of squares of the standardised errors of the mean
    (``d`` of them) and of the covariance (``d (d + 1) / 2`` entries), plus the empirical
    mean and standard deviation for the figure.
    """
    d = z.shape[0]
    eps = torch.randn(n, d, dtype=torch.float64, generator=generator)
    x_t = sample_x_t(z.expand(n, d), eps, t, schedule)
    values = schedule(torch.tensor(t, dtype=torch.float64))
    alpha, beta = float(values.alpha), float(values.beta)

    mean = x_t.mean(0)
    mean_se = (mean - alpha * z) / (beta / math.sqrt(n))

    cov = torch.cov(x_t.T).reshape(d, d)
    rows, cols = torch.triu_indices(d, d)
    diagonal = rows == cols
    cov_target = torch.where(diagonal, beta**2, 0.0)
    cov_sd = torch.where(diagonal, math.sqrt(2.0 / n) * beta**2, beta**2 / math.sqrt(n))
    cov_se = (cov[rows, cols] - cov_target) / cov_sd

    return {
        "t": t,
        "alpha": alpha,
        "beta": beta,
        "mean_error_max_se": float(mean_se.abs().max()),
        "mean_error_sum_sq": float((mean_se**2).sum()),
        "mean_count": d,
        "cov_error_max_se": float(cov_se.abs().max()),
        "cov_error_sum_sq": float((cov_se**2).sum()),
        "cov_count": int(rows.numel()),
        "mean": mean.tolist(),
        "std": float(torch.diagonal(cov).mean().sqrt()),
    }


# --- endpoints -----------------------------------------------------------------------


def endpoint_run(z: torch.Tensor, x0: torch.Tensor, schedule: Schedule, solver: str, steps: int | None, tolerance: float | None) -> dict:
    """Carry ``x0`` (n, d) to ``t = 1`` with the conditional velocity and return the RMS distance to ``z`` and the NFE."""

    def velocity(x, t):
        return conditional_velocity_x(x, z, t, schedule)

    if solver == "dopri5":
        result = integrate(velocity, x0, solver=solver, atol=tolerance, rtol=tolerance)
    else:
        result = integrate(velocity, x0, solver=solver, steps=steps)
    if not torch.isfinite(result.x).all():
        setting = f"tolerance {tolerance:g}" if solver == "dopri5" else f"{steps} steps"
        raise StageError(f"solver {solver} with {setting} produced non-finite values for schedule {schedule!r}; the conditional velocity must stay finite up to t = 1")
    error = float((result.x - z).pow(2).sum(1).mean().sqrt())
    return {"solver": solver, "steps": steps, "tolerance": tolerance, "nfe": result.nfe, "error": error}


def endpoint_errors(z: torch.Tensor, x0: torch.Tensor, schedule: Schedule, params: SinglePointParams) -> list[dict]:
    """Run every solver of ``params.solvers`` at every step count (or tolerance for dopri5)."""
    settings = []
    for solver in params.solvers:
        if solver == "dopri5":
            settings += [(solver, None, tolerance) for tolerance in params.tolerances]
        else:
            settings += [(solver, steps, None) for steps in params.steps]

    records = []
    for solver, steps, tolerance in tqdm(settings, desc="endpoints", unit="run"):
        records.append(endpoint_run(z, x0, schedule, solver, steps, tolerance))
    return records


def most_accurate_setting(records: list[dict]) -> tuple[str, int | None]:
    """Return the fixed-step solver and step count with the smallest endpoint error, else ``("dopri5", None)``."""
    fixed = [r for r in records if r["solver"] != "dopri5"]
    if not fixed:
        return "dopri5", None
    best = min(fixed, key=lambda r: r["error"])
    return best["solver"], best["steps"]


def convergence_order(records: list[dict]) -> float | None:
    """Return the least-squares slope of ``-log(error)`` against ``log(nfe)``, or ``None``.

    Only points with an error above ``ROUNDING_FLOOR`` count. The result is ``None`` when
    fewer than two do, as for a solver that is exact for the schedule (Euler for ``linear``).
    """
    points = [(r["nfe"], r["error"]) for r in records if r["error"] > ROUNDING_FLOOR]
    if len(points) < 2:
        return None
    log_nfe = np.log([p[0] for p in points])
    log_error = np.log([p[1] for p in points])
    slope = np.polyfit(log_nfe, log_error, 1)[0]
    return float(-slope)


# --- figures -------------------------------------------------------------------------


def plot_moments(moments: list[dict], z: torch.Tensor, schedule: Schedule):
    """Plot empirical mean and standard deviation of ``X_t`` against ``alpha_t z`` and ``beta_t``."""
    t_fine = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    values = schedule(t_fine)
    t_points = [m["t"] for m in moments]

    fig, (ax_mean, ax_std) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for k in range(min(z.shape[0], 3)):
        line = ax_mean.plot(t_fine, values.alpha * z[k], label=f"alpha_t z[{k}]")[0]
        ax_mean.plot(t_points, [m["mean"][k] for m in moments], "o", color=line.get_color(), label=f"empirical mean, coordinate {k}")
    ax_mean.set(xlabel="t", ylabel="mean of x_t", title="mean of X_t")
    ax_mean.legend(fontsize=8)

    ax_std.plot(t_fine, values.beta, color="k", label="beta_t")
    ax_std.plot(t_points, [m["std"] for m in moments], "o", color="C3", label="empirical std (root mean of variances)")
    ax_std.set(xlabel="t", ylabel="standard deviation of x_t", title="spread of X_t")
    ax_std.legend(fontsize=8)

    worst_mean = max(m["mean_error_max_se"] for m in moments)
    worst_cov = max(m["cov_error_max_se"] for m in moments)
    fig.suptitle(f"X_t ~ N(alpha_t z, beta_t^2 I), {schedule.name} schedule: max |mean error| = {worst_mean:.2f} SE, max |cov error| = {worst_cov:.2f} SE")
    return fig


def plot_convergence(records: list[dict], schedule: Schedule):
    """Plot RMS endpoint error against steps (fixed-step solvers) and against NFE (all)."""
    fig, (ax_steps, ax_nfe) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    solvers = list(dict.fromkeys(r["solver"] for r in records))
    for i, solver in enumerate(solvers):
        rows = [r for r in records if r["solver"] == solver]
        # Errors of exactly 0 (an exact solver) are drawn at float64 rounding level.
        errors = [max(r["error"], 1e-16) for r in rows]
        style = {"marker": "os^Dv"[i % 5], "color": f"C{i}", "label": solver}
        if solver != "dopri5":
            ax_steps.plot([r["steps"] for r in rows], errors, **style)
        ax_nfe.plot([r["nfe"] for r in rows], errors, **style)

    for ax in (ax_steps, ax_nfe):
        ax.set(xscale="log", yscale="log", ylabel="RMS distance of x_1 to z")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    ax_steps.set(xlabel="steps", title="fixed-step solvers")
    ax_nfe.set(xlabel="velocity evaluations (NFE)", title="all solvers (dopri5: one point per tolerance)")
    fig.suptitle(f"conditional flow from N(0, I) to z, {schedule.name} schedule")
    return fig


def plane_coordinates(points: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, tuple[str, str]]:
    """Project points ``(..., d)`` to 2-D: the coordinates themselves when ``d <= 2``, else onto (z, an orthogonal direction)."""
    d = z.shape[-1]
    if d == 1:
        return torch.stack([points[..., 0], torch.zeros_like(points[..., 0])], dim=-1), ("x[0]", "")
    if d == 2:
        return points, ("x[0]", "x[1]")
    e1 = z / z.norm()
    other = torch.randn(d, dtype=torch.float64, generator=generator)
    e2 = other - (other @ e1) * e1
    e2 = e2 / e2.norm()
    return torch.stack([points @ e1, points @ e2], dim=-1), ("along z", "orthogonal to z (random direction)")


def plot_trajectories(path: torch.Tensor, times: torch.Tensor, z: torch.Tensor, schedule: Schedule, setting: str, generator: torch.Generator):
    """Plot trajectories coloured by ``t`` in a 2-D view, and their distance to ``z`` against ``t``."""
    fig, (ax_plane, ax_distance) = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)

    flat, (x_label, y_label) = plane_coordinates(path, z, generator)
    z_flat, _ = plane_coordinates(z[None, None, :], z, generator)
    norm = plt.Normalize(0.0, 1.0)
    for j in range(path.shape[1]):
        points = flat[:, j, :].numpy()
        segments = np.stack([points[:-1], points[1:]], axis=1)
        collection = LineCollection(segments, cmap="viridis", norm=norm, linewidth=1.0, alpha=0.8)
        collection.set_array(times[:-1].numpy())
        ax_plane.add_collection(collection)
    ax_plane.scatter(flat[0, :, 0], flat[0, :, 1], s=10, color="grey", label="x_0 ~ N(0, I)", zorder=3)
    ax_plane.scatter(z_flat[0, 0, 0], z_flat[0, 0, 1], s=200, marker="*", color="red", edgecolor="k", label="z", zorder=4)
    ax_plane.autoscale()
    ax_plane.set_aspect("equal", adjustable="datalim")
    ax_plane.set(xlabel=x_label, ylabel=y_label, title=f"{path.shape[1]} trajectories ({setting})")
    ax_plane.legend(loc="best", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax_plane, label="t")

    distance = (path - z).norm(dim=-1)
    for j in range(path.shape[1]):
        ax_distance.plot(times, distance[:, j], color="C0", alpha=0.2, linewidth=0.8)
    values = schedule(times)
    exact = values.alpha[:, None, None] * z + values.beta[:, None, None] * path[0]
    ax_distance.plot(times, distance.pow(2).mean(1).sqrt(), color="C0", linewidth=2, label="RMS over trajectories, solver")
    ax_distance.plot(times, (exact - z).norm(dim=-1).pow(2).mean(1).sqrt(), color="k", linestyle="--", label="RMS, exact path alpha_t z + beta_t x_0")
    ax_distance.set(yscale="log", xlabel="t", ylabel="|x_t - z|", title="distance to z")
    ax_distance.set_ylim(bottom=max(float(distance[-1].min()) / 3, 1e-8))
    ax_distance.legend(fontsize=8)
    fig.suptitle(f"the conditional flow carries noise onto z, {schedule.name} schedule")
    return fig


# --- stage ---------------------------------------------------------------------------


def summarise(moments: list[dict], records: list[dict], params: SinglePointParams) -> dict:
    """Return the metrics: moment errors in standard errors, endpoint errors, NFE and orders."""
    mean_count = sum(m["mean_count"] for m in moments)
    cov_count = sum(m["cov_count"] for m in moments)
    metrics = {
        "mean_error_max_se": max(m["mean_error_max_se"] for m in moments),
        "mean_error_rms_se": math.sqrt(sum(m["mean_error_sum_sq"] for m in moments) / mean_count),
        "cov_error_max_se": max(m["cov_error_max_se"] for m in moments),
        "cov_error_rms_se": math.sqrt(sum(m["cov_error_sum_sq"] for m in moments) / cov_count),
        "endpoint_error": {},
        "endpoint_nfe": {},
        "order": {},
        "endpoint_error_min": {},
    }
    for solver in params.solvers:
        rows = [r for r in records if r["solver"] == solver]
        label = "tol_{tolerance:.0e}" if solver == "dopri5" else "steps_{steps}"
        metrics["endpoint_error"][solver] = {label.format(**r): r["error"] for r in rows}
        metrics["endpoint_nfe"][solver] = {label.format(**r): r["nfe"] for r in rows}
        metrics["endpoint_error_min"][solver] = min(r["error"] for r in rows)
        # dopri5 chooses its own steps, so its error against NFE has no fixed order.
        order = None if solver == "dopri5" else convergence_order(rows)
        if order is not None:
            metrics["order"][solver] = order
    return metrics


def main() -> None:
    params = load_params()
    config = params.single_point
    schedule = params.schedule.build()
    # The tensors here hold a few thousand numbers: intra-op threads cost more in
    # synchronisation than they save, and far more when other processes load the cores.
    torch.set_num_threads(1)
    log.info("schedule %r, d = %d, |z| = %g, seed %d", schedule, config.d, config.z_norm, params.seed)

    z = draw_z(config.d, config.z_norm, make_generator(params.seed, STREAM_Z))

    moments_generator = make_generator(params.seed, STREAM_MOMENTS)
    moments = [moment_errors(z, t, config.n_samples, schedule, moments_generator) for t in config.t_grid]
    for m in moments:
        log.info("t = %.3g: mean error max %.2f SE, covariance error max %.2f SE", m["t"], m["mean_error_max_se"], m["cov_error_max_se"])

    x0 = torch.randn(config.n_endpoints, config.d, dtype=torch.float64, generator=make_generator(params.seed, STREAM_ENDPOINTS))
    records = endpoint_errors(z, x0, schedule, config)

    trajectory_solver, trajectory_steps = most_accurate_setting(records)
    trajectory_generator = make_generator(params.seed, STREAM_TRAJECTORIES)
    x0_paths = torch.randn(config.n_trajectories, config.d, dtype=torch.float64, generator=trajectory_generator)
    solved = integrate(lambda x, t: conditional_velocity_x(x, z, t, schedule), x0_paths, solver=trajectory_solver, steps=trajectory_steps, atol=1e-7, rtol=1e-7, record=True)
    if not torch.isfinite(solved.path).all():
        raise StageError(f"trajectories with {trajectory_solver} produced non-finite values for schedule {schedule!r}")

    metrics = summarise(moments, records, config)
    write_json(METRICS_PATH, metrics)
    write_csv(CONVERGENCE_CSV, pd.DataFrame(records, columns=["solver", "steps", "tolerance", "nfe", "error"]).astype({"steps": "Int64"}))
    moment_columns = ["t", "alpha", "beta", "mean_error_max_se", "cov_error_max_se"]
    write_csv(MOMENTS_CSV, pd.DataFrame([{k: m[k] for k in moment_columns} for m in moments]))

    save_figure(plot_moments(moments, z, schedule), FIGURE_DIR / "moments.png")
    save_figure(plot_convergence(records, schedule), FIGURE_DIR / "convergence.png")
    setting = f"{trajectory_steps} steps" if trajectory_steps else "atol = rtol = 1e-7"
    save_figure(plot_trajectories(solved.path, solved.times, z, schedule, f"{trajectory_solver}, {setting}", trajectory_generator), FIGURE_DIR / "trajectories.png")

    log.info("mean error max %.2f SE, covariance error max %.2f SE", metrics["mean_error_max_se"], metrics["cov_error_max_se"])
    for solver in config.solvers:
        log.info("%s: min endpoint error %.2e, order %s", solver, metrics["endpoint_error_min"][solver], metrics["order"].get(solver, "not measurable"))
    log.info("wrote %s, %s, %s and figures in %s", METRICS_PATH, CONVERGENCE_CSV, MOMENTS_CSV, FIGURE_DIR)


if __name__ == "__main__":
    run_stage(main)
