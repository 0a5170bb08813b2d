"""CPU benchmark: this project's CFM trainer against torchcfm and flow_matching on one problem.

Every side trains the same velocity network, ``VelocityMLP`` with 3 hidden layers of
256 units, SiLU and a 32-dimensional time embedding, on the standardised moons set of
``flowmatch.datasets``. All sides use the same initial weights per seed and the same
batches of 1024 (``BatchOrder``). They also share AdamW with one learning rate, its
linear warm-up and cosine decay, gradient clipping at norm 1 and an EMA of decay 0.999
(``flowmatch.training.EMA``). They differ in how a step draws ``(t, x_t, u_t)``:

- ours: ``flowmatch.training.Trainer`` on the linear schedule (``x_t = t z + (1 - t) eps``);
- torchcfm: ``ConditionalFlowMatcher(sigma=0)``, the same path;
- flow_matching: ``AffineProbPath(CondOTScheduler())``, the same path.

Mini-batch optimal transport compares ``Trainer`` with coupling ``minibatch_ot`` against
torchcfm's ``ExactOptimalTransportConditionalFlowMatcher`` (flow_matching has no OT
coupling).

All sides train in one process and take turns every ``--block`` steps (default 1), so
changes in machine load reach every side alike. Each side's W2 to held-out data uses
the EMA weights, ``--n-eval`` samples (2000 by default) from Euler with 100 steps, and
``flowmatch.metrics.w2``, beside the noise floor of ``flowmatch.metrics.noise_floor``.
Sampling throughput compares the three libraries' Euler samplers at NFE 100 on one
trained model.

PyTorch and the BLAS library run on one thread each, so that the figures do not
depend on the core count. Usage: ``python bench/bench_cpu.py [--steps N] [--ot-steps N]``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flowmatch import metrics
from flowmatch.datasets import make_rng, make_toy
from flowmatch.models import VelocityMLP
from flowmatch.schedules import get_schedule
from flowmatch.solvers import integrate
from flowmatch.training import EMA, BatchOrder, Trainer, TrainSettings, model_velocity, warmup_cosine_factor

log = logging.getLogger("bench_cpu")

HIDDEN = 256
LAYERS = 3
TIME_DIM = 32
BATCH_SIZE = 1024
LR = 2e-3
GRAD_CLIP = 1.0
EMA_DECAY = 0.999
MOONS_NOISE = 0.05
N_TRAIN = 20_000
N_EVAL = 2000
FLOOR_SEEDS = 5
SAMPLE_NFE = 100
# Modules of the extra `bench` in pyproject.toml; torchdyn comes with torchcfm and
# supplies its sampler.
BENCH_MODULES = ("torchcfm", "flow_matching", "torchdyn", "threadpoolctl")


@dataclass
class Side:
    """One training run being benchmarked: its step function, EMA and the seconds spent in steps."""

    name: str
    step: Callable[[torch.Tensor], float]
    model: nn.Module
    ema: EMA
    seconds: float = 0.0
    steps: int = 0
    losses: list[float] = field(default_factory=list)

    def ema_model(self) -> nn.Module:
        model = VelocityMLP((2,), HIDDEN, LAYERS, TIME_DIM)
        model.load_state_dict(self.ema.shadow)
        return model.eval().requires_grad_(False)


def new_model(seed: int) -> nn.Module:
    """Return the benchmark's network with the initial weights of ``seed``, the same for every side."""
    torch.manual_seed(seed)
    return VelocityMLP((2,), HIDDEN, LAYERS, TIME_DIM)


def settings(steps: int, coupling: str) -> TrainSettings:
    return TrainSettings(
        steps=steps, batch_size=BATCH_SIZE, lr=LR, warmup_steps=max(1, steps // 20), grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, coupling=coupling
    )


def ours(seed: int, steps: int, coupling: str) -> Side:
    model = new_model(seed)
    trainer = Trainer(model, get_schedule("linear"), settings(steps, coupling), seed=seed)
    label = "ours" if coupling == "independent" else "ours (minibatch_ot)"
    return Side(label, trainer.step, model, trainer.ema)


def hand_loop(name: str, seed: int, steps: int, draw: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Side:
    """Return a side whose step is a plain training loop around ``draw(z) -> (t, x_t, u_t)``.

    The optimiser, learning-rate schedule, clipping and EMA are those of ``Trainer``.
    """
    model = new_model(seed)
    config = settings(steps, "independent")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, config.warmup_steps, config.steps))
    ema = EMA(model, config.ema_decay)

    def step(z: torch.Tensor) -> float:
        t, x_t, u_t = draw(z)
        loss = torch.mean((model(x_t, t) - u_t) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(model)
        return loss.item()

    return Side(name, step, model, ema)


def torchcfm_side(seed: int, steps: int, coupling: str) -> Side:
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher

    matcher = ConditionalFlowMatcher(sigma=0.0) if coupling == "independent" else ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)

    def draw(z):
        return matcher.sample_location_and_conditional_flow(torch.randn_like(z), z)

    return hand_loop("torchcfm" if coupling == "independent" else "torchcfm (ExactOT)", seed, steps, draw)


def flow_matching_side(seed: int, steps: int) -> Side:
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    path = AffineProbPath(scheduler=CondOTScheduler())

    def draw(z):
        sample = path.sample(x_0=torch.randn_like(z), x_1=z, t=torch.rand(z.shape[0]))
        return sample.t, sample.x_t, sample.dx_t

    return hand_loop("flow_matching", seed, steps, draw)


def train_round_robin(sides: list[Side], data: torch.Tensor, steps: int, block: int, seed: int) -> None:
    """Train every side for ``steps`` steps, taking turns every ``block`` steps, timing only the steps."""
    order = BatchOrder(len(data), BATCH_SIZE, seed)
    report_every = max(1, steps // 5)
    for start in range(0, steps, block):
        stop = min(steps, start + block)
        batches = [data[torch.from_numpy(order.indices(step))] for step in range(start, stop)]
        # The side that goes first changes every turn, so none always follows the same one.
        shift = (start // block) % len(sides)
        for side in sides[shift:] + sides[:shift]:
            began = time.perf_counter()
            for batch in batches:
                side.losses.append(side.step(batch))
            side.seconds += time.perf_counter() - began
            side.steps += stop - start
        if stop == steps or stop // report_every != start // report_every:
            log.info("step %d of %d: %s", stop, steps, ", ".join(f"{side.name} loss {np.mean(side.losses[-report_every:]):.4f}" for side in sides))


def sample_w2(model: nn.Module, x0: torch.Tensor, heldout: np.ndarray) -> float:
    with torch.no_grad():
        x1 = integrate(model_velocity(model), x0, solver="euler", steps=SAMPLE_NFE).x
    return metrics.w2(x1.double().numpy(), heldout)


@dataclass
class Summary:
    """Throughput and W2 of one side over the seeds."""

    name: str
    steps_per_second: list[float] = field(default_factory=list)
    w2: list[float] = field(default_factory=list)


def run_comparison(label: str, build: list[Callable[[int], Side]], steps: int, block: int, seeds: list[int], data: torch.Tensor, heldout: np.ndarray) -> tuple[list[Summary], nn.Module]:
    """Train each side for every seed and return per-side summaries and the first side's last EMA model."""
    summaries: dict[str, Summary] = {}
    model = None
    for seed in seeds:
        sides = [make(seed) for make in build]
        log.info("%s, seed %d: %s for %d steps of batch %d", label, seed, ", ".join(side.name for side in sides), steps, BATCH_SIZE)
        train_round_robin(sides, data, steps, block, seed)
        x0 = torch.randn((len(heldout), 2), generator=torch.Generator().manual_seed(10_000 + seed))
        for side in sides:
            summary = summaries.setdefault(side.name, Summary(side.name))
            summary.steps_per_second.append(side.steps / side.seconds)
            summary.w2.append(sample_w2(side.ema_model(), x0, heldout))
        model = sides[0].ema_model()
    return list(summaries.values()), model


def sampling_throughput(model: nn.Module, n: int, repeats: int) -> dict[str, float]:
    """Return samples per second of each library's Euler sampler at NFE 100, best of ``repeats`` interleaved runs."""
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper
    from torchdyn.core import NeuralODE

    class TimeBatched(ModelWrapper):
        """flow_matching's wrapper: ``t`` arrives as a 0-d tensor, the network wants ``(n,)``."""

        def forward(self, x, t, **extras):
            return self.model(x, t.expand(x.shape[0]))

    class TorchdynField(nn.Module):
        """torchdyn's vector field signature ``f(t, x)``, as torchcfm's examples sample."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, t, x, *args, **kwargs):
            return self.model(x, t.expand(x.shape[0]))

    velocity = model_velocity(model)
    fm_solver = ODESolver(velocity_model=TimeBatched(model))
    node = NeuralODE(TorchdynField(model), solver="euler", sensitivity="adjoint")
    t_span = torch.linspace(0.0, 1.0, SAMPLE_NFE + 1)
    x0 = torch.randn((n, 2), generator=torch.Generator().manual_seed(7))
    samplers = {
        "ours (flowmatch.solvers.integrate)": lambda: integrate(velocity, x0, solver="euler", steps=SAMPLE_NFE).x,
        "flow_matching (ODESolver)": lambda: fm_solver.sample(x0, step_size=1.0 / SAMPLE_NFE, method="euler"),
        "torchcfm (torchdyn NeuralODE)": lambda: node.trajectory(x0, t_span=t_span)[-1],
    }
    endpoints = {}
    best = {name: float("inf") for name in samplers}
    with torch.no_grad():
        for _ in range(repeats):
            for name, sample in samplers.items():
                began = time.perf_counter()
                endpoints[name] = sample()
                best[name] = min(best[name], time.perf_counter() - began)
    reference = endpoints["ours (flowmatch.solvers.integrate)"]
    for name, x in endpoints.items():
        gap = float((x - reference).abs().max())
        log.info("%s: max |x - ours| = %.2e at t = 1", name, gap)
    return {name: n / seconds for name, seconds in best.items()}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(title: str, summaries: list[Summary], floor: metrics.NoiseFloor) -> None:
    print(f"\n{title}")
    print(f"{'side':<24} {'steps/s (mean +- sd)':>22} {'ours / side':>12} {'W2 (mean +- sd)':>20}")
    ours_rate = statistics.fmean(summaries[0].steps_per_second)
    for summary in summaries:
        rate, rate_sd = spread(summary.steps_per_second)
        w2, w2_sd = spread(summary.w2)
        print(f"{summary.name:<24} {rate:>13.2f} +- {rate_sd:<5.2f} {ours_rate / rate:>12.3f} {w2:>11.4f} +- {w2_sd:.4f}")
    print(f"{'noise floor':<24} {'':>22} {'':>12} {floor.mean:>11.4f} +- {floor.std:.4f}")
    ours_w2 = statistics.fmean(summaries[0].w2)
    for summary in summaries[1:]:
        ratio = ours_rate / statistics.fmean(summary.steps_per_second)
        w2_gap = ours_w2 - statistics.fmean(summary.w2)
        verdict = "yes" if ratio >= 1.0 and w2_gap <= floor.std else "no"
        print(f"  against {summary.name}: speed ratio {ratio:.3f}, mean W2 ours minus theirs {w2_gap:+.4f} (floor sd {floor.std:.4f}); both met: {verdict}")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Return the names in ``names`` that fail to import."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each plain CFM run (default 1000)")
    parser.add_argument("--ot-steps", type=int, default=250, help="training steps of each minibatch OT run (default 250)")
    parser.add_argument("--block", type=int, default=1, help="steps per turn in the round-robin (default 1)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per side (default 3)")
    parser.add_argument("--n-eval", type=int, default=N_EVAL, help=f"samples and held-out points of each W2 (default {N_EVAL})")
    parser.add_argument("--sample-n", type=int, default=10_000, help="samples per run in the sampling benchmark (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each sampler, best counted (default 3)")
    args = parser.parse_args(argv)
    for name in ("steps", "ot_steps", "block", "seeds", "n_eval", "sample_n", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    missing = missing_modules(BENCH_MODULES)
    if missing:
        print(
            f"bench_cpu: the comparison needs torchcfm and flow_matching, but these modules are missing: {', '.join(missing)}. "
            "Run `make bench`, which installs the extra `bench`, or `pip install -e '.[bench]'`",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    began = time.perf_counter()

    toy = make_toy("moons", noise=MOONS_NOISE)
    data = torch.from_numpy(toy.sample(N_TRAIN, make_rng(0, "bench", "train"))).float()
    heldout = toy.sample(args.n_eval, make_rng(0, "bench", "heldout"))
    floor = metrics.noise_floor(metrics.w2, toy.sample, args.n_eval, [make_rng(0, "bench", "floor", k) for k in range(FLOOR_SEEDS)])
    seeds = list(range(args.seeds))

    import flow_matching
    import torchcfm

    print(f"bench_cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, torchcfm {torchcfm.__version__}, flow_matching {flow_matching.__version__}")
    print(f"threads: torch {torch.get_num_threads()}, BLAS 1; batch {BATCH_SIZE}; VelocityMLP {LAYERS} x {HIDDEN} SiLU; AdamW lr {LR}; clip {GRAD_CLIP}; EMA {EMA_DECAY}")
    print(f"W2: {args.n_eval} Euler samples at NFE {SAMPLE_NFE} (EMA weights) against {args.n_eval} held-out points; noise floor over {FLOOR_SEEDS} seeds")

    plain, model = run_comparison(
        "plain CFM", [lambda s: ours(s, args.steps, "independent"), lambda s: torchcfm_side(s, args.steps, "independent"), lambda s: flow_matching_side(s, args.steps)],
        args.steps, args.block, seeds, data, heldout,
    )
    print_table(f"plain CFM, {args.steps} steps, seeds {seeds}", plain, floor)

    ot_runs, _ = run_comparison(
        "minibatch OT", [lambda s: ours(s, args.ot_steps, "minibatch_ot"), lambda s: torchcfm_side(s, args.ot_steps, "minibatch_ot")],
        args.ot_steps, args.block, seeds, data, heldout,
    )
    print_table(f"minibatch OT CFM, {args.ot_steps} steps, seeds {seeds}", ot_runs, floor)

    rates = sampling_throughput(model, args.sample_n, args.repeats)
    print(f"\nsampling: {args.sample_n} samples, Euler at NFE {SAMPLE_NFE}, best of {args.repeats}")
    ours_rate = rates["ours (flowmatch.solvers.integrate)"]
    for name, rate in rates.items():
        print(f"{name:<36} {rate:>10.0f} samples/s   ours / this {ours_rate / rate:.3f}")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
