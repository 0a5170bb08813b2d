"""Stage `marginal_flow`: check the marginal (posterior-weighted) velocity numerically.

Four checks, each a block of reports/metrics/marginal_flow.json:

- ``memorisation``: the exact marginal velocity of ``n_points`` training points of
  ``dataset`` (an empirical distribution), integrated from ``n_samples`` draws of
  ``N(0, I)`` with ``solver``, lands on the training points themselves. Reported: the
  fraction of samples within ``radius`` of a training point, against the same fraction
  for fresh test points of the data set, which a model that generalises would match;
- ``gaussian_mc``: for data ``N(mean, cov)`` (data/prepared/gaussian.npz), the
  self-normalised Monte Carlo average of conditional velocities over ``m`` samples of
  ``z`` converges to the closed form. Each of ``mc_n_query`` points ``x ~ p_t`` per time
  of ``mc_t_grid`` gets its own fresh samples, so that the standardised errors
  (error over the estimated standard error, per coordinate) are independent and their
  root mean square should be near 1. Reported at the largest ``m``, with the slope of
  log error against log ``m`` over ``mc_sizes`` (-1/2 expected);
- ``gaussian_flow``: integrating the closed-form Gaussian velocity from ``N(0, I)``
  gives samples whose mean and covariance match ``mean`` and ``cov`` within standard
  errors, and the solver's distance to the exact flow map;
- ``continuity``: ``d p_t / dt + div(p_t u_t) = 0`` by central differences on grids in
  1-D and 2-D for small Gaussian mixtures (``MIXTURE_1D``, ``MIXTURE_2D``), relative
  to the size of the terms, with the fitted order in the spacing (2 expected).

Two more checks use the closed-form Gaussian flow as a reference (``stages.gaussian_checks``
describes them):

- ``solver_order``: the convergence order of each fixed-step solver under the fixed
  cosine schedule, where 1, 2, 2 and 4 are expected for euler, midpoint, heun and rk4.
  ``solver_order_study`` gives the orders under the study's schedule, and
  ``solver_order_schedules`` names both schedules;
- ``likelihood_error_max``: the largest error, in nats, of the exact-divergence
  log-likelihood against ``log N(x; mean, cov)``. ``hutchinson_z`` is the largest error
  of the Hutchinson estimate in its standard errors, and ``likelihood`` has the details.

For the ``vp`` schedule the marginal at ``t = 0`` is only close to ``N(0, I)``
(``alpha_0 > 0``), which shifts the flow's samples by an amount of order ``alpha_0``.

Figures in reports/figures/marginal/: landing.png, velocity_density.png,
gaussian_mc.png, gaussian_flow.png, continuity.png, solver_convergence.png,
likelihood.png. Plot data in reports/plots/: marginal_mc_convergence.csv,
marginal_continuity.csv, solver_convergence.csv.
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
from matplotlib.patches import Ellipse  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flowmatch.continuity import continuity_terms, grid_points  # noqa: E402
from flowmatch.gaussian import GaussianPath  # noqa: E402
from flowmatch.marginal import marginal_velocity, mixture_log_density, monte_carlo_velocity  # noqa: E402
from flowmatch.schedules import Schedule, get_schedule  # noqa: E402
from flowmatch.solvers import integrate  # noqa: E402
from stages import gaussian_checks  # noqa: E402
from stages.common import StageError, load_npz, run_stage, save_figure, write_csv, write_json  # noqa: E402
from stages.config import MarginalFlowParams, load_params  # noqa: E402

log = logging.getLogger("flowmatch.marginal_flow")

PREPARED_DIR = Path("data/prepared")
FIGURE_DIR = Path("reports/figures/marginal")
METRICS_PATH = Path("reports/metrics/marginal_flow.json")
MC_CSV = Path("reports/plots/marginal_mc_convergence.csv")
CONTINUITY_CSV = Path("reports/plots/marginal_continuity.csv")
SOLVER_CSV = Path("reports/plots/solver_convergence.csv")

# Independent random streams, so that changing one sample size leaves the other draws alone.
STREAM_LANDING, STREAM_MC, STREAM_FLOW, STREAM_ORDERS, STREAM_LIKELIHOOD = range(5)

# Mixture centres of the continuity check and the square [-L, L]^d of its grid.
MIXTURE_1D = ((-1.0,), (0.5,), (2.0,))
MIXTURE_2D = ((-1.0, -1.0), (1.5, 0.0), (0.0, 1.5), (1.0, 1.0))
CONTINUITY_HALF_WIDTH = 3.0

# Grids of the velocity and density figure: half-width, density and stream resolution.
FIELD_HALF_WIDTH = 3.0
DENSITY_RESOLUTION = 181
STREAM_RESOLUTION = 41


def make_generator(seed: int, stream: int) -> torch.Generator:
    """Return a generator for one random stream of the stage, derived from ``seed``."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def solve(velocity, x0: torch.Tensor, config: MarginalFlowParams, label: str) -> torch.Tensor:
    """Integrate ``velocity`` from ``x0`` at ``t = 0`` to ``t = 1`` with the configured solver, rejecting non-finite results."""
    result = integrate(velocity, x0, solver=config.solver, steps=config.steps, atol=config.tolerance, rtol=config.tolerance)
    if not torch.isfinite(result.x).all():
        raise StageError(f"{label}: solver {config.solver} produced non-finite values; try more steps or another solver (marginal_flow.solver, marginal_flow.steps)")
    log.info("%s: %s used %d velocity evaluations", label, config.solver, result.nfe)
    return result.x


def fit_slope(x: list[float], y: list[float]) -> float:
    """Return the least-squares slope of ``log y`` against ``log x``."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# --- memorisation --------------------------------------------------------------------


def nearest_distance(points: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Return each point's distance to the nearest row of ``data``, shape ``(n,)``, exact down to 0."""
    # The matrix-product form of cdist loses distances below about 1e-8 to cancellation.
    return torch.cdist(points, data, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values


def check_memorisation(data: torch.Tensor, test: torch.Tensor, schedule: Schedule, config: MarginalFlowParams, generator: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry noise to ``t = 1`` with the exact marginal velocity of ``data`` (m, d).

    Returns the metrics, the samples (n, d), and the nearest-training-point distances of
    the samples and of the ``test`` points.
    """
    x0 = torch.randn(config.n_samples, data.shape[1], dtype=torch.float64, generator=generator)
    samples = solve(lambda x, t: marginal_velocity(x, t, data, schedule), x0, config, "exact marginal flow")

    nearest = nearest_distance(samples, data)
    nearest_test = nearest_distance(test, data)
    metrics = {
        "fraction_within_radius": float((nearest <= config.radius).double().mean()),
        "test_fraction_within_radius": float((nearest_test <= config.radius).double().mean()),
        "nearest_distance_median": float(nearest.median()),
        "nearest_distance_max": float(nearest.max()),
        "test_nearest_distance_median": float(nearest_test.median()),
    }
    return metrics, samples, nearest, nearest_test


# --- the Gaussian case ---------------------------------------------------------------


def monte_carlo_errors(path: GaussianPath, t: float, m: int, n_query: int, generator: torch.Generator) -> dict:
    """Estimate ``u_t`` at ``n_query`` points ``x ~ p_t``, each from its own ``m`` samples of ``z``.

    Returns RMS errors and standard errors over the points, the sum of squared
    standardised errors over points and coordinates, their maximum, and the smallest
    effective sample size.
    """
    x = path.sample(n_query, t, generator)
    exact = path.velocity(x, t)
    errors, standard_errors, ess = [], [], []
    for j in range(n_query):
        z_samples = path.sample(m, 1.0, generator)
        estimate = monte_carlo_velocity(x[j : j + 1], t, z_samples, path.schedule)
        errors.append(estimate.velocity[0] - exact[j])
        standard_errors.append(estimate.standard_error[0])
        ess.append(float(estimate.effective_sample_size[0]))
    errors = torch.stack(errors)
    standard_errors = torch.stack(standard_errors)
    # One sample taking all the weight gives a standard error of 0. A tiny floor keeps
    # the standardised error finite but huge, which flags the degenerate estimate.
    standardised = errors / standard_errors.clamp_min(1e-300)
    return {
        "t": t,
        "m": m,
        "error_rms": float(errors.pow(2).sum(1).mean().sqrt()),
        "standard_error_rms": float(standard_errors.pow(2).sum(1).mean().sqrt()),
        "z_sum_sq": float(standardised.pow(2).sum()),
        "z_count": standardised.numel(),
        "z_max": float(standardised.abs().max()),
        "ess_min": min(ess),
    }


def check_gaussian_mc(path: GaussianPath, config: MarginalFlowParams, generator: torch.Generator) -> tuple[dict, list[dict]]:
    """Run the Monte Carlo check at every ``t`` of ``mc_t_grid`` and every ``m`` of ``mc_sizes``."""
    settings = [(t, m) for t in config.mc_t_grid for m in sorted(config.mc_sizes)]
    records = [monte_carlo_errors(path, t, m, config.mc_n_query, generator) for t, m in tqdm(settings, desc="monte carlo", unit="setting")]
    for r in records:
        r["z_rms"] = math.sqrt(r["z_sum_sq"] / r["z_count"])

    largest = [r for r in records if r["m"] == max(config.mc_sizes)]
    metrics = {
        "m": max(config.mc_sizes),
        "error_rms": math.sqrt(sum(r["error_rms"] ** 2 for r in largest) / len(largest)),
        "standard_error_rms": math.sqrt(sum(r["standard_error_rms"] ** 2 for r in largest) / len(largest)),
        "z_rms": math.sqrt(sum(r["z_sum_sq"] for r in largest) / sum(r["z_count"] for r in largest)),
        "z_max": max(r["z_max"] for r in largest),
        "ess_min": min(r["ess_min"] for r in largest),
    }
    if len(set(config.mc_sizes)) >= 2:
        slopes = [fit_slope([r["m"] for r in records if r["t"] == t], [r["error_rms"] for r in records if r["t"] == t]) for t in config.mc_t_grid]
        metrics["error_slope"] = float(np.mean(slopes))
    return metrics, records


def check_gaussian_flow(path: GaussianPath, config: MarginalFlowParams, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Integrate the closed-form velocity from ``N(0, I)``; compare the samples' moments with ``mean`` and ``cov``.

    Standard errors: ``sqrt(cov_kk / n)`` for mean coordinate ``k`` and
    ``sqrt((cov_ii cov_jj + cov_ij^2) / n)`` for covariance entry ``(i, j)``, the
    large-``n`` standard deviations of the sample moments of Gaussian data.
    """
    n, d = config.n_samples, path.dim
    x0 = torch.randn(n, d, dtype=torch.float64, generator=generator)
    samples = solve(path.velocity, x0, config, "Gaussian closed-form flow")
    exact = path.flow(x0, 1.0)

    mean_se = (samples.mean(0) - path.mean) / torch.sqrt(torch.diagonal(path.cov) / n)
    cov = torch.cov(samples.T).reshape(d, d)
    rows, cols = torch.triu_indices(d, d)
    variance = torch.diagonal(path.cov)
    cov_sd = torch.sqrt((variance[rows] * variance[cols] + path.cov[rows, cols] ** 2) / n)
    cov_se = (cov[rows, cols] - path.cov[rows, cols]) / cov_sd

    metrics = {
        "mean_error_max_se": float(mean_se.abs().max()),
        "cov_error_max_se": float(cov_se.abs().max()),
        "solver_error_rms": float((samples - exact).pow(2).sum(1).mean().sqrt()),
    }
    return metrics, samples


# --- continuity ----------------------------------------------------------------------


def check_continuity(schedule: Schedule, config: MarginalFlowParams) -> tuple[dict, list[dict]]:
    """Evaluate the continuity residual in 1-D and 2-D at every time and spacing."""
    records = []
    mixtures = {1: torch.tensor(MIXTURE_1D, dtype=torch.float64), 2: torch.tensor(MIXTURE_2D, dtype=torch.float64)}
    for dim, data in mixtures.items():
        for h in sorted(config.continuity_spacings, reverse=True):
            x = grid_points(-CONTINUITY_HALF_WIDTH, CONTINUITY_HALF_WIDTH, h, dim)
            for t in config.continuity_t_grid:
                terms = continuity_terms(x, t, data, schedule, h)
                records.append({"dim": dim, "t": t, "h": h, "relative_residual": terms.relative_residual()})

    metrics = {}
    finest = min(config.continuity_spacings)
    for dim in mixtures:
        rows = [r for r in records if r["dim"] == dim]
        metrics[f"residual_{dim}d"] = max(r["relative_residual"] for r in rows if r["h"] == finest)
        if len(set(config.continuity_spacings)) >= 2:
            worst = {h: max(r["relative_residual"] for r in rows if r["h"] == h) for h in config.continuity_spacings}
            metrics[f"order_{dim}d"] = fit_slope(list(worst), list(worst.values()))
    return metrics, records


# --- figures -------------------------------------------------------------------------


def plot_landing(data: torch.Tensor, samples: torch.Tensor, nearest: torch.Tensor, test_nearest: torch.Tensor, radius: float, dataset: str, schedule: Schedule):
    """Plot where the exact flow's samples land over the training points, and their nearest distances."""
    fig, (ax_points, ax_hist) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    ax_points.scatter(data[:, 0], data[:, 1], s=40, facecolors="none", edgecolors="C0", linewidths=1.0, label=f"{data.shape[0]} training points")
    ax_points.scatter(samples[:, 0], samples[:, 1], s=4, color="C3", label=f"{samples.shape[0]} samples of the exact flow")
    ax_points.set_aspect("equal", adjustable="datalim")
    ax_points.set(xlabel="x[0]", ylabel="x[1]", title=f"samples land on training points ({dataset})")
    ax_points.legend(loc="upper right", fontsize=8)

    # Distances of exactly 0 (a sample on a training point to the last bit) go in the first bin.
    floor = 1e-12
    low = max(min(float(nearest.min()), float(test_nearest.min())), floor)
    high = max(float(nearest.max()), float(test_nearest.max()), radius) * 1.5
    bins = np.logspace(math.log10(low), math.log10(high), 50)
    ax_hist.hist(nearest.clamp_min(floor).numpy(), bins=bins, color="C3", alpha=0.7, label="exact-flow samples")
    ax_hist.hist(test_nearest.clamp_min(floor).numpy(), bins=bins, color="C0", alpha=0.5, label="fresh test points")
    ax_hist.axvline(radius, color="k", linestyle="--", label=f"radius {radius:g}")
    ax_hist.set(xscale="log", xlabel=f"distance to the nearest training point (0 counted at {floor:g})", ylabel="count", title="nearest-neighbour distance")
    ax_hist.legend(fontsize=8)
    fig.suptitle(f"the exact marginal velocity of a finite data set memorises it, {schedule.name} schedule")
    return fig


def plot_velocity_density(data: torch.Tensor, t_grid: tuple[float, ...], schedule: Schedule, dataset: str):
    """Plot log density ``p_t`` with streamlines of ``u_t`` for each ``t`` of ``t_grid``."""
    axis = torch.linspace(-FIELD_HALF_WIDTH, FIELD_HALF_WIDTH, DENSITY_RESOLUTION, dtype=torch.float64)
    stream_axis = torch.linspace(-FIELD_HALF_WIDTH, FIELD_HALF_WIDTH, STREAM_RESOLUTION, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    stream_y, stream_x = torch.meshgrid(stream_axis, stream_axis, indexing="ij")
    stream_points = torch.stack([stream_x.reshape(-1), stream_y.reshape(-1)], dim=1)

    columns = len(t_grid)
    fig, axes = plt.subplots(1, columns, figsize=(3.6 * columns + 1.0, 4.2), constrained_layout=True, squeeze=False)
    extent = (-FIELD_HALF_WIDTH, FIELD_HALF_WIDTH, -FIELD_HALF_WIDTH, FIELD_HALF_WIDTH)
    for ax, t in zip(axes[0], t_grid, strict=True):
        log_p = mixture_log_density(points, t, data, schedule).reshape(grid_x.shape)
        # Each panel shows eight nats below its own peak, so narrow peaks near t = 1 stay visible.
        relative = (log_p - log_p.max()).numpy()
        image = ax.imshow(relative, origin="lower", extent=extent, cmap="magma", vmin=-8.0, vmax=0.0)
        velocity = marginal_velocity(stream_points, t, data, schedule)
        speed = velocity.norm(dim=1).reshape(stream_x.shape)
        ax.streamplot(
            stream_x.numpy(), stream_y.numpy(),
            velocity[:, 0].reshape(stream_x.shape).numpy(), velocity[:, 1].reshape(stream_x.shape).numpy(),
            color=torch.log10(speed.clamp_min(1e-12)).numpy(), cmap="Blues", density=1.0, linewidth=0.8, arrowsize=0.8,
        )
        ax.set(title=f"t = {t:g}", xlabel="x[0]", xlim=extent[:2], ylim=extent[2:])
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("x[1]")
    fig.colorbar(image, ax=axes[0].tolist(), label="log p_t(x) - max_x log p_t(x)", shrink=0.8)
    fig.suptitle(f"density p_t and streamlines of u_t (lighter: slower), {data.shape[0]} points of {dataset}, {schedule.name} schedule")
    return fig


def plot_gaussian_mc(records: list[dict], schedule: Schedule, metrics: dict):
    """Plot Monte Carlo error and standard error against ``m`` for each time."""
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    times = list(dict.fromkeys(r["t"] for r in records))
    for i, t in enumerate(times):
        rows = [r for r in records if r["t"] == t]
        m = [r["m"] for r in rows]
        ax.plot(m, [r["error_rms"] for r in rows], "o-", color=f"C{i}", label=f"t = {t:g}: RMS error")
        ax.plot(m, [r["standard_error_rms"] for r in rows], "--", color=f"C{i}", label=f"t = {t:g}: RMS standard error")
    m_all = sorted({r["m"] for r in records})
    first = records[0]
    ax.plot(m_all, [first["standard_error_rms"] * math.sqrt(first["m"] / m) for m in m_all], ":", color="grey", label="slope -1/2")
    ax.set(xscale="log", yscale="log", xlabel="samples of z (m)", ylabel="error of the estimate of u_t(x)")
    ax.set_title(f"Monte Carlo average of u_t(x|z) -> closed form, {schedule.name} schedule\nat m = {metrics['m']}: standardised error RMS {metrics['z_rms']:.2f}, max {metrics['z_max']:.2f}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def covariance_ellipse(mean: np.ndarray, cov: np.ndarray, **style) -> Ellipse:
    """Return the two-standard-deviation ellipse of a 2-D Gaussian."""
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(eigenvectors[1, 1], eigenvectors[0, 1]))
    width, height = 4 * math.sqrt(eigenvalues[1]), 4 * math.sqrt(eigenvalues[0])
    return Ellipse(mean, width, height, angle=angle, fill=False, **style)


def plot_gaussian_flow(samples: torch.Tensor, path: GaussianPath, schedule: Schedule, metrics: dict):
    """Plot the closed-form flow's samples with the target and empirical two-sigma ellipses (first two coordinates; a histogram in 1-D)."""
    fig, ax = plt.subplots(figsize=(6.5, 6), constrained_layout=True)
    if path.dim == 1:
        values = samples[:, 0].numpy()
        grid = np.linspace(values.min(), values.max(), 200)
        mean, sd = float(path.mean[0]), math.sqrt(float(path.cov[0, 0]))
        ax.hist(values, bins=40, density=True, color="C0", alpha=0.6, label=f"{samples.shape[0]} samples at t = 1")
        ax.plot(grid, np.exp(-0.5 * ((grid - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), color="k", label="N(mean, cov)")
        ax.set(xlabel="x", ylabel="density")
    else:
        xy = samples[:, :2].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=3, color="C0", alpha=0.5, label=f"{samples.shape[0]} samples at t = 1")
        ax.add_patch(covariance_ellipse(path.mean[:2].numpy(), path.cov[:2, :2].numpy(), color="k", linewidth=2, label="N(mean, cov): 2 sd"))
        ax.add_patch(covariance_ellipse(xy.mean(0), np.cov(xy.T), color="C3", linestyle="--", linewidth=2, label="samples: 2 sd"))
        ax.set_aspect("equal", adjustable="datalim")
        ax.set(xlabel="x[0]", ylabel="x[1]")
    ax.set_title(f"closed-form Gaussian flow from N(0, I), {schedule.name} schedule\nmean error max {metrics['mean_error_max_se']:.2f} SE, covariance error max {metrics['cov_error_max_se']:.2f} SE", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def plot_continuity(records: list[dict], schedule: Schedule, t_middle: float, h_finest: float):
    """Plot relative continuity residual against the spacing, and both terms in 1-D at one time."""
    fig, (ax_order, ax_terms) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    times = sorted({r["t"] for r in records})
    for dim, style in ((1, "o-"), (2, "s--")):
        for i, t in enumerate(times):
            rows = sorted((r for r in records if r["dim"] == dim and r["t"] == t), key=lambda r: r["h"])
            ax_order.plot([r["h"] for r in rows], [r["relative_residual"] for r in rows], style, color=f"C{i}", label=f"{dim}-D, t = {t:g}")
    spacings = sorted({r["h"] for r in records})
    top = max(r["relative_residual"] for r in records if r["h"] == spacings[-1])
    ax_order.plot(spacings, [top * (h / spacings[-1]) ** 2 for h in spacings], ":", color="grey", label="slope 2")
    ax_order.set(xscale="log", yscale="log", xlabel="grid spacing h (also the time step)", ylabel="max |residual| / max |term|", title="residual of d p_t/dt + div(p_t u_t)")
    ax_order.grid(True, which="major", alpha=0.3)
    ax_order.legend(fontsize=7, ncol=2)

    data = torch.tensor(MIXTURE_1D, dtype=torch.float64)
    x = grid_points(-CONTINUITY_HALF_WIDTH, CONTINUITY_HALF_WIDTH, h_finest, 1)
    terms = continuity_terms(x, t_middle, data, schedule, h_finest)
    ax_terms.plot(x[:, 0], terms.d_p_dt, color="C0", linewidth=2.5, label="d p_t / dt")
    ax_terms.plot(x[:, 0], -terms.div_flux, color="C1", linestyle="--", linewidth=1.5, label="-div(p_t u_t)")
    ax_terms.plot(x[:, 0], terms.residual, color="k", linewidth=1.0, label="residual")
    ax_terms.set(xlabel="x", title=f"1-D mixture at t = {t_middle:g}, h = {h_finest:g}")
    ax_terms.legend(fontsize=8)
    fig.suptitle(f"continuity equation for Gaussian mixtures, {schedule.name} schedule")
    return fig


# --- stage ---------------------------------------------------------------------------


def load_arrays(config: MarginalFlowParams) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """Return the ``n_points`` training points, up to ``n_samples`` test points, and the arrays of gaussian.npz."""
    prepared = load_npz(PREPARED_DIR / f"{config.dataset}.npz")
    train = prepared["train"]
    if train.shape[0] < config.n_points:
        raise StageError(f"{PREPARED_DIR / config.dataset}.npz has {train.shape[0]} training points, fewer than marginal_flow.n_points = {config.n_points}; lower it or raise data.n_train")
    if train.ndim != 2 or train.shape[1] != 2:
        raise StageError(f"{PREPARED_DIR / config.dataset}.npz: expected 2-D points, got training array of shape {train.shape}")
    data = torch.tensor(train[: config.n_points], dtype=torch.float64)
    test = torch.tensor(prepared["test"][: config.n_samples], dtype=torch.float64)
    gaussian = load_npz(PREPARED_DIR / "gaussian.npz")
    return data, test, gaussian


def main() -> None:
    params = load_params()
    config = params.marginal_flow
    schedule = params.schedule.build()
    # The tensors here hold a few thousand numbers: intra-op threads cost more in
    # synchronisation than they save, and far more when other processes load the cores.
    torch.set_num_threads(1)
    log.info("schedule %r, data set %s, %d points, solver %s", schedule, config.dataset, config.n_points, config.solver)

    data, test, gaussian = load_arrays(config)
    path = GaussianPath(torch.as_tensor(gaussian["mean"]), torch.as_tensor(gaussian["cov"]), schedule)

    memorisation, samples, nearest, test_nearest = check_memorisation(data, test, schedule, config, make_generator(params.seed, STREAM_LANDING))
    log.info("exact flow: %.3f of samples within %g of a training point (fresh test points: %.3f)", memorisation["fraction_within_radius"], config.radius, memorisation["test_fraction_within_radius"])

    mc_metrics, mc_records = check_gaussian_mc(path, config, make_generator(params.seed, STREAM_MC))
    log.info("Monte Carlo at m = %d: RMS error %.3g, standardised error RMS %.2f, max %.2f", mc_metrics["m"], mc_metrics["error_rms"], mc_metrics["z_rms"], mc_metrics["z_max"])

    flow_metrics, flow_samples = check_gaussian_flow(path, config, make_generator(params.seed, STREAM_FLOW))
    log.info("Gaussian flow: mean error max %.2f SE, covariance error max %.2f SE, solver error %.2e", flow_metrics["mean_error_max_se"], flow_metrics["cov_error_max_se"], flow_metrics["solver_error_rms"])

    continuity_metrics, continuity_records = check_continuity(schedule, config)
    log.info("continuity: relative residual %.2e (1-D), %.2e (2-D) at h = %g", continuity_metrics["residual_1d"], continuity_metrics["residual_2d"], min(config.continuity_spacings))

    reference = get_schedule(gaussian_checks.REFERENCE_SCHEDULE)
    order_metrics, order_records = gaussian_checks.check_solver_orders(path.mean, path.cov, reference, schedule, make_generator(params.seed, STREAM_ORDERS))
    for key, role in (("solver_order", "reference"), ("solver_order_study", "study")):
        orders = ", ".join(f"{solver} {order:.2f}" for solver, order in order_metrics[key].items())
        log.info("solver orders on the Gaussian flow, %s schedule %s: %s", role, order_metrics["solver_order_schedules"][role], orders)

    points = torch.tensor(gaussian["test"][: gaussian_checks.LIKELIHOOD_N], dtype=torch.float64)
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, STREAM_LIKELIHOOD]))
    likelihood_metrics, likelihood_values = gaussian_checks.check_likelihood(path.mean, path.cov, points, schedule, rng, make_generator(params.seed, STREAM_LIKELIHOOD))
    log.info("likelihood: max error %.2e nats over %d points; Hutchinson max |z| %.2f", likelihood_metrics["likelihood_error_max"], points.shape[0], likelihood_metrics["hutchinson_z"])

    metrics = {
        "memorisation": memorisation, "gaussian_mc": mc_metrics, "gaussian_flow": flow_metrics, "continuity": continuity_metrics,
        **order_metrics, **likelihood_metrics,
    }
    write_json(METRICS_PATH, metrics)
    mc_columns = ["t", "m", "error_rms", "standard_error_rms", "z_rms", "z_max", "ess_min"]
    write_csv(MC_CSV, pd.DataFrame([{k: r[k] for k in mc_columns} for r in mc_records]))
    write_csv(CONTINUITY_CSV, pd.DataFrame(continuity_records, columns=["dim", "t", "h", "relative_residual"]))
    write_csv(SOLVER_CSV, pd.DataFrame(order_records, columns=["role", "schedule", "solver", "steps", "nfe", "error"]))

    save_figure(plot_landing(data, samples, nearest, test_nearest, config.radius, config.dataset, schedule), FIGURE_DIR / "landing.png")
    save_figure(plot_velocity_density(data, config.t_grid, schedule, config.dataset), FIGURE_DIR / "velocity_density.png")
    save_figure(plot_gaussian_mc(mc_records, schedule, mc_metrics), FIGURE_DIR / "gaussian_mc.png")
    save_figure(plot_gaussian_flow(flow_samples, path, schedule, flow_metrics), FIGURE_DIR / "gaussian_flow.png")
    t_middle = sorted(config.continuity_t_grid)[len(config.continuity_t_grid) // 2]
    save_figure(plot_continuity(continuity_records, schedule, t_middle, min(config.continuity_spacings)), FIGURE_DIR / "continuity.png")
    save_figure(gaussian_checks.plot_solver_convergence(order_records, order_metrics), FIGURE_DIR / "solver_convergence.png")
    save_figure(gaussian_checks.plot_likelihood(likelihood_values, likelihood_metrics, schedule), FIGURE_DIR / "likelihood.png")
    log.info("wrote %s, %s, %s, %s and figures in %s", METRICS_PATH, MC_CSV, CONTINUITY_CSV, SOLVER_CSV, FIGURE_DIR)


if __name__ == "__main__":
    run_stage(main)
