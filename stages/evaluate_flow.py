"""Metrics of the learned velocity field itself, for the evaluate stage.

The sample metrics of ``stages.evaluate`` score what the trained model generates. The
functions here score the model ``v_theta(x, t)`` of ``data/models/DATASET/model.pt``
(EMA weights) directly:

- ``nll``: the held-out negative log-likelihood in nats per sample (``nll_per_dim``
  divides it by the dimension). It comes from the instantaneous change of variables
  (``flowmatch.likelihood.log_likelihood``), integrated from the data back to ``t = 0``.
  For the Gaussian case ``nll_true`` is the same average under the true ``N(mean, cov)``.
- ``straightness``: the time average of ``E |v_theta(x_t, t) - (x_1 - x_0)|^2`` along
  trajectories of the learned flow from fresh noise (``flowmatch.metrics.straightness``).
  It is 0 when every trajectory is a straight line run at constant speed, which a
  single Euler step then follows exactly.
- ``velocity_error`` (Gaussian case): the relative L2 error of ``v_theta`` against the
  closed-form marginal velocity ``u_t``, averaged over a grid of times. Under the cosine
  schedule ``u_t`` itself goes to 0 as ``t -> 1`` (``d_alpha_1 = 0``), so the relative
  error grows there even when the absolute error does not.

Schedules with ``d_beta`` infinite at ``t = 1`` (``schedule.singular_at_one``) are
trained on ``t <= 1 - SINGULAR_TIME_MARGIN`` only, so their flows are integrated on
``[0, t_end]`` with ``t_end`` that bound. Their ``nll`` is then ``-log p_{t_end}``: the
density of the path at ``t_end``, the data blurred by noise of standard deviation
``beta_{t_end}``. The metrics file states ``t_end`` as ``nll_t_end``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flowmatch import metrics
from flowmatch.datasets import make_rng
from flowmatch.gaussian import GaussianPath
from flowmatch.likelihood import log_likelihood
from flowmatch.schedules import Schedule
from flowmatch.solvers import Velocity, integrate
from flowmatch.training import LoadedModel, load_model_file, max_training_time, model_velocity
from stages.common import StageError, save_figure, write_csv

log = logging.getLogger("flowmatch.evaluate")

MODEL_DIR = Path("data/models")

# Fixed-step solver that draws the trajectories whose straightness is measured.
STRAIGHTNESS_SOLVER = "rk4"


@dataclass(frozen=True)
class NllSettings:
    """Settings of the log-likelihood integration.

    ``solver`` with ``steps`` (fixed-step solvers) or ``tolerance`` (dopri5's atol =
    rtol). The divergence is exact up to ``exact_max_dim`` dimensions. Above that it is
    the Hutchinson estimate with ``probes`` Rademacher probes.
    """

    solver: str
    steps: int
    tolerance: float
    exact_max_dim: int
    probes: int


def load_model(dataset: str) -> LoadedModel:
    """Load the EMA model of ``dataset`` and its training schedule; raise ``StageError`` when that fails."""
    path = MODEL_DIR / dataset / "model.pt"
    if not path.exists():
        raise StageError(f"{path}: file not found; run the train stage first (dvc repro train@{dataset})")
    try:
        return load_model_file(path)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as error:
        raise StageError(f"{path}: cannot read the model ({type(error).__name__}: {error}); delete it and rerun dvc repro") from error


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """Return a torch generator seeded from the numpy generator ``rng``."""
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def end_time(schedule: Schedule) -> float:
    """Return where the learned flow ends: 1, or ``1 - SINGULAR_TIME_MARGIN`` for a schedule singular at ``t = 1``."""
    return max_training_time(schedule)


def base_log_density(schedule: Schedule, mean: np.ndarray, cov: np.ndarray):
    """Return ``log p_0``, the density at ``t = 0`` of the path, or None for ``N(0, I)``.

    Every schedule but ``vp`` has ``alpha_0 = 0`` and ``beta_0 = 1``, so ``p_0 = N(0, I)``.
    Under ``vp`` the path starts from ``alpha_0 Z + beta_0 eps`` with ``alpha_0`` about
    0.0066. Its density is taken as the Gaussian with the same mean and covariance,
    ``N(alpha_0 mean, alpha_0^2 cov + beta_0^2 I)``, where ``mean`` and ``cov`` are the
    data's. That is exact for Gaussian data. For other data the error in ``log p_0`` is
    of order ``alpha_0^4``.
    """
    if schedule.alpha_0_gap == 0.0:
        return None
    path = GaussianPath(torch.as_tensor(mean), torch.as_tensor(cov), schedule)
    return lambda x: path.log_density(x, 0.0)


def held_out_nll(velocity: Velocity, points: np.ndarray, schedule: Schedule, settings: NllSettings, generator: torch.Generator, log_p0=None) -> dict:
    """Return ``nll`` (nats per sample), ``nll_per_dim`` and ``nll_t_end`` of ``points`` ``(n, ...)`` under the learned flow.

    The integration runs in float64 from ``t_end = end_time(schedule)`` back to 0.
    ``nll`` and ``nll_per_dim`` are None when a log-likelihood is not finite.
    """
    x1 = torch.as_tensor(points, dtype=torch.float64)
    dim = x1[0].numel()
    t_end = end_time(schedule)
    divergence = "exact" if dim <= settings.exact_max_dim else "hutchinson"
    log_p = log_likelihood(
        velocity, x1,
        solver=settings.solver, steps=settings.steps, atol=settings.tolerance, rtol=settings.tolerance,
        divergence=divergence, n_probes=settings.probes, generator=generator,
        t1=t_end, log_p0=log_p0,
    )

    result = {"nll": None, "nll_per_dim": None, "nll_t_end": t_end}
    bad = int((~torch.isfinite(log_p)).sum())
    if bad:
        log.warning("%d of %d held-out log-likelihoods are not finite; nll is reported as null", bad, len(log_p))
        return result
    nll = float(-log_p.mean())
    result.update({"nll": nll, "nll_per_dim": nll / dim})
    log.info("held-out nll on %d points: %.5f nats (%.5f per dimension; %s divergence, %s)", len(x1), nll, nll / dim, divergence, settings.solver)
    return result


def straightness_curve(velocity: Velocity, x0: torch.Tensor, steps: int, t_end: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Return ``straightness``, the times ``(k,)`` and ``E |v - (x_1 - x_0)|^2`` at each time ``(k,)``.

    Trajectories start from ``x0`` ``(n, ...)`` at ``t = 0`` and follow ``velocity`` with
    ``steps`` rk4 steps to ``t_end``. The velocity is evaluated again at every step time.
    A flow that ends at ``t_end < 1`` is rescaled to unit duration first (velocities times
    ``t_end``), so that a straight line run at constant speed still scores 0.
    """
    with torch.no_grad():
        result = integrate(velocity, x0, solver=STRAIGHTNESS_SOLVER, steps=steps, t0=0.0, t1=t_end, record=True)
        velocities = torch.stack([velocity(x, t) for x, t in zip(result.path, result.times)])

    path = result.path.double().numpy()
    scaled = t_end * velocities.double().numpy()
    times = result.times.double().numpy()
    value = metrics.straightness(path, scaled, times)

    displacement = path[-1] - path[0]
    per_time = ((scaled - displacement[None]) ** 2).reshape(len(path), path.shape[1], -1).sum(axis=2).mean(axis=1)
    return value, times, per_time


def velocity_error_curve(velocity: Velocity, path: GaussianPath, times: np.ndarray, n: int, generator: torch.Generator) -> np.ndarray:
    """Return the relative L2 error ``||v - u_t||_{p_t} / ||u_t||_{p_t}`` at each of ``times``, shape ``(k,)``.

    At each time, ``n`` points ``x ~ p_t`` are drawn from the closed-form marginal of
    ``path``, and both norms are root mean squares over those points.
    """
    errors = []
    with torch.no_grad():
        for t in times:
            x = path.sample(n, float(t), generator)
            exact = path.velocity(x, float(t))
            learned = velocity(x, torch.tensor(float(t), dtype=torch.float64)).double()
            errors.append(float(torch.sqrt(((learned - exact) ** 2).sum() / (exact**2).sum())))
    return np.asarray(errors)


def gaussian_nll(points: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Return ``-mean log N(points; mean, cov)`` in nats, for ``points`` of shape ``(n, d)``."""
    distribution = torch.distributions.MultivariateNormal(torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64))
    return float(-distribution.log_prob(torch.as_tensor(points, dtype=torch.float64)).mean())


@dataclass
class LearnedFlowResult:
    """The metrics of the learned flow and the per-time curves behind them."""

    metrics: dict
    straightness_times: np.ndarray
    straightness_per_time: np.ndarray
    velocity_error_times: np.ndarray | None = None
    velocity_error: np.ndarray | None = None
    seconds: float = 0.0


def evaluate_learned_flow(dataset: str, kind: str, loaded: LoadedModel, prepared: dict[str, np.ndarray], settings, seed: int) -> LearnedFlowResult:
    """Compute the learned-flow metrics of ``dataset`` (``kind`` toy, gaussian or image) for the model ``loaded``.

    ``settings`` is the ``evaluate`` section of the parameters (``EvaluateParams``), and
    every random draw comes from its own stream of ``seed``. Low-dimensional sets get
    ``nll``, every set gets ``straightness``, and the Gaussian case also gets
    ``nll_true`` and ``velocity_error``.
    """
    start = time.perf_counter()
    schedule = loaded.schedule
    velocity = model_velocity(loaded.model)
    shape = tuple(prepared["test"].shape[1:])
    log.info("learned flow of %s: EMA model at step %d, trained along %r", dataset, loaded.step, schedule)
    result: dict = {}

    if kind != "image":
        n = min(settings.nll_n, len(prepared["test"]))
        points = subsample_rows(prepared["test"], n, make_rng(seed, dataset, "evaluate", "nll_subset"))
        if kind == "gaussian":
            mean, cov = prepared["mean"], prepared["cov"]
        else:
            train = prepared["train"].astype(np.float64)
            mean, cov = train.mean(axis=0), np.cov(train, rowvar=False)
        nll_settings = NllSettings(settings.nll_solver, settings.nll_steps, settings.nll_tolerance, settings.nll_exact_max_dim, settings.nll_probes)
        generator = torch_generator(make_rng(seed, dataset, "evaluate", "nll_probes"))
        result["n_nll"] = n
        result.update(held_out_nll(velocity, points, schedule, nll_settings, generator, base_log_density(schedule, mean, cov)))
        if kind == "gaussian":
            result["nll_true"] = gaussian_nll(points, mean, cov)
            log.info("nll under the true N(mean, cov): %.5f nats", result["nll_true"])

    # NOTE: this costs about 5 * straightness_steps model calls on straightness_n inputs.
    # That is a few seconds for the MLPs of the 2-D and 8 x 8 sets, but can take minutes
    # for a U-Net on larger images on the CPU.
    generator = torch_generator(make_rng(seed, dataset, "evaluate", "straightness"))
    x0 = torch.randn((settings.straightness_n, *shape), generator=generator)
    value, times, per_time = straightness_curve(velocity, x0, settings.straightness_steps, end_time(schedule))
    result.update({"n_straightness": settings.straightness_n, "straightness": value})
    log.info("straightness of %d trajectories (%d %s steps): %.5f", settings.straightness_n, settings.straightness_steps, STRAIGHTNESS_SOLVER, value)
    flow = LearnedFlowResult(result, times, per_time)

    if kind == "gaussian":
        path = GaussianPath(torch.as_tensor(prepared["mean"]), torch.as_tensor(prepared["cov"]), schedule)
        grid = np.linspace(settings.velocity_error_t_min, settings.velocity_error_t_max, settings.velocity_error_times)
        generator = torch_generator(make_rng(seed, dataset, "evaluate", "velocity_error"))
        errors = velocity_error_curve(velocity, path, grid, settings.velocity_error_n, generator)
        result.update({"velocity_error": float(errors.mean()), "velocity_error_max": float(errors.max())})
        log.info("relative velocity error against the closed form: mean %.5f, max %.5f over %d times", errors.mean(), errors.max(), len(grid))
        flow.velocity_error_times, flow.velocity_error = grid, errors
    flow.seconds = time.perf_counter() - start
    return flow


def subsample_rows(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` rows of ``points`` chosen without replacement, in their original order."""
    if len(points) == n:
        return points
    return points[np.sort(rng.choice(len(points), size=n, replace=False))]


def write_learned_flow_plots(flow: LearnedFlowResult, plots_dir: Path, figures_dir: Path, dataset: str) -> None:
    """Write the per-time curves as CSV under ``plots_dir`` and draw them under ``figures_dir``.

    ``straightness.csv`` has columns ``t`` and ``squared_deviation`` (``E |v - (x_1 - x_0)|^2``
    at each time), and the Gaussian case adds ``velocity_error.csv`` (``t``, ``velocity_error``).
    """
    straightness = pd.DataFrame({"t": flow.straightness_times, "squared_deviation": flow.straightness_per_time})
    write_csv(plots_dir / "straightness.csv", straightness)
    plot_curve(straightness, "squared_deviation", figures_dir / "straightness.png", f"{dataset}: deviation of the learned velocity from x_1 - x_0 (straightness {flow.metrics['straightness']:.4g})", "E |v(x_t, t) - (x_1 - x_0)|^2")

    if flow.velocity_error is not None:
        errors = pd.DataFrame({"t": flow.velocity_error_times, "velocity_error": flow.velocity_error})
        write_csv(plots_dir / "velocity_error.csv", errors)
        plot_curve(errors, "velocity_error", figures_dir / "velocity_error.png", f"{dataset}: learned velocity against the closed form (mean {flow.metrics['velocity_error']:.4g})", "||v - u_t|| / ||u_t|| over x ~ p_t")


def plot_curve(frame: pd.DataFrame, column: str, path: Path, title: str, label: str) -> None:
    """Plot ``frame[column]`` against ``frame["t"]``, on a log scale when every value is positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(frame["t"], frame[column], marker=".")
    if (frame[column] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
