"""Draw samples from one trained model with several ODE solvers: ``python -m stages.sample DATASET``.

Reads data/models/DATASET/model.pt (EMA weights and training schedule) and params
``schedule``, ``schedules`` and ``sample``. Every solver starts from the same
``sample.n_samples`` noise draws, made with ``sample.seed``, and integrates from t = 0
to t = 1 once per NFE budget in ``sample.nfe``:

- a fixed-step solver takes ``nfe // NFE_PER_STEP[solver]`` uniform steps and skips
  budgets below one step;
- dopri5 is adaptive, so its NFE follows from the tolerance, not from a step count. It
  runs at each ``atol = rtol`` in ``sample.dopri5_tolerances``, from the loosest, and
  stops once a run needs more than the largest budget. Each budget gets the run with
  the tightest tolerance whose actual NFE fits it, and budgets that no run fits are
  skipped. Two budgets can share one run.

The manifest records the actual NFE of every run. With ``sample.schedule`` set to
another schedule than the training one, the model's velocity is converted by
``flowmatch.reparam.ScheduleChange`` and the samples follow that schedule's path.

Writes data/samples/DATASET/samples.npz (float32 array ``{solver}_nfe{budget}`` of
shape ``(n_samples, *shape)`` per run), data/samples/DATASET/manifest.json, and
reports/timing/sample_DATASET.json (seconds, and samples per second at the largest
budget). A run that yields any non-finite sample stops the stage before it writes
anything.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowmatch.reparam import ScheduleChange
from flowmatch.solvers import NFE_PER_STEP, integrate
from flowmatch.training import LoadedModel, load_model_file, model_velocity
from stages.common import StageError, run_stage, save_npz, write_json
from stages.config import SampleParams, load_params
from stages.train import parse_dataset_argument

log = logging.getLogger("flowmatch.sample")

MODEL_DIR = Path("data/models")
SAMPLE_DIR = Path("data/samples")
TIMING_DIR = Path("reports/timing")

# A dopri5 run is abandoned once it has spent this many times the largest budget,
# since no budget could use its result.
DOPRI5_CALL_LIMIT_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Run:
    """One integration: its samples, cost and time."""

    solver: str
    x: np.ndarray
    nfe: int
    steps: int
    seconds: float
    tolerance: float | None = None


class _CallLimitExceeded(Exception):
    pass


def _limit_calls(velocity, limit: int):
    calls = 0

    def limited(x, t):
        nonlocal calls
        calls += 1
        if calls > limit:
            raise _CallLimitExceeded
        return velocity(x, t)

    return limited


def load_model(dataset: str, device: torch.device | str = "cpu") -> LoadedModel:
    path = MODEL_DIR / dataset / "model.pt"
    if not path.exists():
        raise StageError(f"{path}: file not found; run the train stage first (dvc repro train@{dataset})")
    try:
        return load_model_file(path, map_location=device)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as error:
        raise StageError(f"{path}: cannot read the model ({type(error).__name__}: {error}); delete it and rerun dvc repro") from error


def _solve(velocity, x0: torch.Tensor, solver: str, **options) -> tuple[torch.Tensor, int, int, float]:
    """Return the final state, NFE, step count and seconds of one integration from t = 0 to 1."""
    start = time.perf_counter()
    with torch.no_grad():
        # dopri5 reports its accepted steps only when it records the path.
        result = integrate(velocity, x0, solver=solver, record=solver == "dopri5", **options)
    if x0.is_cuda:
        torch.cuda.synchronize(x0.device)
    seconds = time.perf_counter() - start
    return result.x, result.nfe, len(result.times) - 1, seconds


def _check_finite(x: torch.Tensor, solver: str, budget: int) -> None:
    bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).sum())
    if bad:
        raise StageError(
            f"{solver} at NFE budget {budget}: {bad} of {x.shape[0]} samples are not finite; "
            "the model or the solver diverged, so nothing was written"
        )


def fixed_step_runs(velocity, x0: torch.Tensor, solver: str, budgets: tuple[int, ...]) -> dict[int, Run]:
    """Return one run per budget that allows at least one step of ``solver``."""
    runs = {}
    for budget in budgets:
        steps = budget // NFE_PER_STEP[solver]
        if steps < 1:
            log.info("%s: skipping NFE budget %d, below the %d evaluations of one step", solver, budget, NFE_PER_STEP[solver])
            continue
        x, nfe, steps, seconds = _solve(velocity, x0, solver, steps=steps)
        _check_finite(x, solver, budget)
        runs[budget] = Run(solver, x.cpu().numpy().astype(np.float32), nfe, steps, seconds)
    return runs


def dopri5_runs(velocity, x0: torch.Tensor, budgets: tuple[int, ...], tolerances: tuple[float, ...]) -> dict[int, Run]:
    """Return, per budget, the dopri5 run with the tightest tolerance whose NFE fits the budget."""
    largest = max(budgets)
    tried: list[Run] = []
    for tolerance in sorted(tolerances, reverse=True):
        limited = _limit_calls(velocity, DOPRI5_CALL_LIMIT_FACTOR * largest)
        try:
            x, nfe, steps, seconds = _solve(limited, x0, "dopri5", atol=tolerance, rtol=tolerance)
        except _CallLimitExceeded:
            log.info("dopri5: tolerance %g needs more than %d evaluations; tighter ones are not tried", tolerance, DOPRI5_CALL_LIMIT_FACTOR * largest)
            break
        _check_finite(x, "dopri5", largest)
        log.info("dopri5: tolerance %g took %d evaluations in %d steps", tolerance, nfe, steps)
        tried.append(Run("dopri5", x.cpu().numpy().astype(np.float32), nfe, steps, seconds, tolerance))
        if nfe > largest:
            break

    runs = {}
    for budget in budgets:
        fitting = [run for run in tried if run.nfe <= budget]
        if not fitting:
            log.info("dopri5: skipping NFE budget %d, which no tolerance in sample.dopri5_tolerances fits", budget)
            continue
        runs[budget] = min(fitting, key=lambda run: run.tolerance)
    return runs


def sample(dataset: str, settings: SampleParams, schedule_params) -> None:
    # U-Nets on MNIST-sized images take hours to sample on a CPU and seconds on a GPU.
    # NOTE: the CUDA path has not been run; the tests run on CPUs only.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(dataset, device)
    train_schedule = loaded.schedule
    velocity = model_velocity(loaded.model)
    sample_schedule = train_schedule
    if settings.schedule is not None and settings.schedule != train_schedule.name:
        sample_schedule = schedule_params.build(settings.schedule)
        velocity = ScheduleChange(train_schedule, sample_schedule).velocity(velocity)
    shape = tuple(loaded.config["shape"])
    log.info(
        "sampling %s: %d samples of shape %s on %s, trained along %r, sampled along %r",
        dataset, settings.n_samples, list(shape), device, train_schedule, sample_schedule,
    )

    generator = torch.Generator().manual_seed(settings.seed)
    # The noise is drawn on the CPU, so the same seed gives the same start on every device.
    x0 = torch.randn((settings.n_samples, *shape), generator=generator).to(device)
    budgets = tuple(sorted(settings.nfe))

    start = time.perf_counter()
    runs: list[tuple[int, Run]] = []
    for solver in tqdm(settings.solvers, desc=f"sample {dataset}", unit="solver"):
        if solver == "dopri5":
            by_budget = dopri5_runs(velocity, x0, budgets, settings.dopri5_tolerances)
        else:
            by_budget = fixed_step_runs(velocity, x0, solver, budgets)
        runs += sorted(by_budget.items())
    seconds = time.perf_counter() - start
    if not runs:
        raise StageError(f"no solver in sample.solvers fits any budget in sample.nfe = {list(settings.nfe)}; raise the budgets")

    _write_outputs(dataset, settings, runs, train_schedule.name, sample_schedule.name, shape, seconds)


def _write_outputs(dataset, settings, runs, train_schedule, sample_schedule, shape, seconds):
    arrays = {}
    records = []
    for budget, run in runs:
        key = f"{run.solver}_nfe{budget}"
        arrays[key] = run.x
        # No seconds here: the manifest is DVC-tracked data and must be the same bytes on every
        # run; times go to the timing file only.
        record = {"solver": run.solver, "nfe_budget": budget, "nfe": run.nfe, "steps": run.steps, "key": key}
        if run.tolerance is not None:
            record["tolerance"] = run.tolerance
        records.append(record)
    manifest = {
        "dataset": dataset,
        "train_schedule": train_schedule,
        "sample_schedule": sample_schedule,
        "n_samples": settings.n_samples,
        "seed": settings.seed,
        "shape": list(shape),
        "records": records,
    }
    out_dir = SAMPLE_DIR / dataset
    save_npz(out_dir / "samples.npz", **arrays)
    write_json(out_dir / "manifest.json", manifest)

    # Throughput of each solver at the largest budget it ran.
    largest = {}
    for budget, run in runs:
        largest[run.solver] = (budget, run)
    timing = {
        "seconds": round(seconds, 3),
        "samples_per_second": {solver: round(settings.n_samples / max(run.seconds, 1e-9), 1) for solver, (_, run) in largest.items()},
        "nfe": {solver: run.nfe for solver, (_, run) in largest.items()},
    }
    timing_path = TIMING_DIR / f"sample_{dataset}.json"
    write_json(timing_path, timing)
    log.info("wrote %d sample sets to %s and %s in %.1f s", len(records), out_dir, timing_path, seconds)


def main() -> None:
    params = load_params()
    dataset = parse_dataset_argument(sys.argv[1:], "sample")
    if params.sample.threads > 0:
        torch.set_num_threads(params.sample.threads)
    sample(dataset, params.sample, params.schedule)


if __name__ == "__main__":
    run_stage(main)
