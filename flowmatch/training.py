"""Conditional flow matching (CFM) training and loading of trained velocity models.

The CFM objective regresses the network onto the conditional velocity:

    L(theta) = E_{t, z, eps} || v_theta(x_t, t) - (d_alpha_t z + d_beta_t eps) ||^2,
    x_t = alpha_t z + beta_t eps,

averaged over the dimensions of ``x``. Its minimiser is the marginal velocity
``u_t(x) = E[u_t(x | Z) | X_t = x]``. The data order is a function of ``(seed,
step)`` and the noise and times of a step are a function of ``(seed, rank, step)``,
so a run resumed from a checkpoint draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowmatch.coupling import couple
from flowmatch.models import build_model
from flowmatch.paths import expand_time
from flowmatch.schedules import Schedule, get_schedule

TIME_SAMPLINGS = ("uniform", "logit_normal")

# Schedules with ``d_beta`` infinite at t = 1 (linear_vp, vp) give the CFM target a
# variance of order d_beta^2 that diverges as t -> 1, so their training times stop at
# 1 - SINGULAR_TIME_MARGIN. With 1e-3, |d_beta| stays below about 23 (linear_vp) and 5
# (vp with beta_min = 0.1, beta_max = 20).
SINGULAR_TIME_MARGIN = 1e-3

MODEL_FILE_FORMAT = 1

# Steps whose noise seeds ``Trainer`` computes in one go (see ``Trainer._step_generator``).
STEP_SEED_BLOCK = 256


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite; ``step`` is the step that produced it."""

    def __init__(self, step: int, loss: float):
        self.step = step
        self.loss = loss
        super().__init__(f"the training loss is {loss} at step {step}")


class NonFiniteGradientError(ArithmeticError):
    """The loss was finite but its gradient norm is NaN or infinite; ``step`` is the step that produced it."""

    def __init__(self, step: int, loss: float, norm: float):
        self.step = step
        self.loss = loss
        self.norm = norm
        super().__init__(f"the gradient norm is {norm} at step {step}, where the loss is {loss}")


def max_training_time(schedule: Schedule) -> float:
    """Return the largest training time: 1, or ``1 - SINGULAR_TIME_MARGIN`` when ``d_beta`` is infinite at 1."""
    return 1.0 - SINGULAR_TIME_MARGIN if schedule.singular_at_one else 1.0


def sample_time(
    n: int,
    method: str,
    *,
    t_max: float = 1.0,
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``n`` training times in ``[0, t_max]``, shape ``(n,)``.

    ``uniform``: ``t = t_max * U`` with ``U ~ U(0, 1)``. ``logit_normal``: ``t = t_max *
    sigmoid(loc + scale * N(0, 1))``, which puts more weight on the middle of the path
    for ``loc = 0``.
    """
    if method == "uniform":
        unit = torch.rand(n, generator=generator, device=device)
    elif method == "logit_normal":
        unit = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampling {method!r}; accepted: {', '.join(TIME_SAMPLINGS)}")
    # Multiplying by 1.0 changes no value, so it is skipped (one tensor operation less per step).
    return unit if t_max == 1.0 else t_max * unit


def cfm_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Return the CFM loss, a 0-d tensor: the mean of ``(v_theta(x_t, t) - u_t(x_t | z))^2``.

    ``z`` and ``eps`` have shape ``(n, ...)`` and ``t`` has shape ``(n,)``. The mean runs
    over the batch and the dimensions, and it is computed in float32 even when the
    model output is bfloat16.
    """
    # The schedule is evaluated once for both; the arithmetic is that of sample_x_t and conditional_velocity.
    values = schedule(expand_time(t, z))
    x_t = values.alpha * z + values.beta * eps
    u_t = values.d_alpha * z + values.d_beta * eps
    v = model(x_t, t)
    return torch.mean((v.float() - u_t.float()) ** 2)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Return the learning-rate factor at ``step``: linear warm-up to 1, then cosine decay to 0.

    During warm-up the factor is ``(step + 1) / warmup_steps``. Afterwards it is
    ``0.5 (1 + cos(pi p))``, where ``p`` is the fraction of the remaining steps done.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# Devices on which PyTorch has a fused AdamW kernel for float32 and bfloat16 parameters.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Return AdamW over ``model``'s parameters, with the fused kernel where the device has one.

    The fused kernel updates each parameter tensor in one pass instead of a chain of
    elementwise operations. For the 3 x 256 velocity MLP on one CPU thread, the update
    took 0.22 ms instead of 0.50 ms (torch 2.14, one core of an Intel Xeon), about 3 % of
    a training step of batch 1024. The update rule is the same. The last bits of the
    results can differ from the loop implementation, because the operations are grouped
    differently.
    """
    parameters = list(model.parameters())
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.dtype in (torch.float32, torch.bfloat16) for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


class EMA:
    """An exponential moving average of a model's parameters: ``e <- d e + (1 - d) p``.

    The decay of update ``k`` (counted from 1) is ``min(decay, (1 + k) / (10 + k))``.
    Early updates thus average over the few steps taken so far, not over the random
    initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.state_dict().items()}

    def current_decay(self) -> float:
        """Return the decay that the next ``update`` applies."""
        k = self.updates + 1
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        shadows, values = [], []
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadows.append(shadow)
                values.append(value.detach())
            else:
                shadow.copy_(value)
        if shadows:
            # One multi-tensor kernel per operation; elementwise the same as mul_ then add_ per tensor.
            torch._foreach_mul_(shadows, decay)
            torch._foreach_add_(shadows, values, alpha=1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


class BatchOrder:
    """The global order of training examples, shared by every rank.

    The examples are visited epoch by epoch, each epoch in a fresh permutation drawn
    from ``(seed, epoch)``. Batch ``step`` is positions ``[step * batch_size, (step + 1)
    * batch_size)`` of the concatenated epochs. It depends only on ``(seed, step)``,
    so a resumed run needs no sampler state.
    """

    def __init__(self, n_data: int, batch_size: int, seed: int):
        if n_data < 1 or batch_size < 1:
            raise ValueError(f"BatchOrder needs n_data >= 1 and batch_size >= 1, got {n_data} and {batch_size}")
        self.n_data = n_data
        self.batch_size = batch_size
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_data)
        return self._cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Return the ``batch_size`` example indices of global batch ``step``."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = positions // self.n_data
        result = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            result[mask] = self._permutation(int(epoch))[positions[mask] % self.n_data]
        return result


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Return rank ``rank``'s contiguous share of a global batch whose size ``world_size`` divides."""
    if len(indices) % world_size:
        raise ValueError(f"a batch of {len(indices)} cannot be split evenly between {world_size} processes")
    size = len(indices) // world_size
    return indices[rank * size : (rank + 1) * size]


def step_seed(seed: int, rank: int, step: int) -> int:
    """Return the 64-bit seed of the noise and times that rank ``rank`` draws at ``step``."""
    entropy = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return int(entropy[0]) << 32 | int(entropy[1])


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return the generator of the noise and times that rank ``rank`` draws at ``step``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, step))
    return generator


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of the optimisation, independent of file locations."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    grad_clip: float
    ema_decay: float
    time_sampling: str = "uniform"
    logit_normal_loc: float = 0.0
    logit_normal_scale: float = 1.0
    coupling: str = "independent"
    bf16: bool = False
    weight_decay: float = 0.0


class Trainer:
    """One CFM optimisation: the model, its EMA, AdamW and the warm-up/cosine schedule.

    ``model`` is the plain module. ``forward`` is what computes the output: the
    module itself, or its DistributedDataParallel and/or ``torch.compile`` wrapper.
    With several processes every rank has its own ``Trainer``. ``step`` averages the loss
    over ranks (an all-reduce) before it checks that the loss is finite, so all ranks
    stop together.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, settings: TrainSettings, *, seed: int, rank: int = 0, world_size: int = 1, forward: nn.Module | None = None):
        self.model = model
        self.forward = forward if forward is not None else model
        self.schedule = schedule
        self.settings = settings
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = next(model.parameters()).device
        self.t_max = max_training_time(schedule)

        self.optimizer = make_adamw(model, settings.lr, settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine_factor(step, settings.warmup_steps, settings.steps)
        )
        self.ema = EMA(model, settings.ema_decay)
        self.step_count = 0
        self._generator = torch.Generator(device=self.device)
        self._seeds: dict[int, int] = {}

    def _step_generator(self) -> torch.Generator:
        """Return this step's generator, seeded as ``step_generator`` seeds it.

        The seeds of ``STEP_SEED_BLOCK`` steps are computed at once. Between training
        steps one SeedSequence takes about 30 microseconds on a CPU, in a loop about 5.
        """
        step = self.step_count
        if step not in self._seeds:
            self._seeds = {k: step_seed(self.seed, self.rank, k) for k in range(step, step + STEP_SEED_BLOCK)}
        return self._generator.manual_seed(self._seeds[step])

    def _autocast(self):
        if self.settings.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, z: torch.Tensor) -> float:
        """Take one optimiser step on this rank's data batch ``z``; return the loss averaged over ranks.

        Raises ``NonFiniteLossError`` if the loss is NaN or infinite, and
        ``NonFiniteGradientError`` if the norm of its gradient is, both before any
        parameter changes. DDP averages the gradients during ``backward``, so every rank
        computes the same norm and all ranks stop together.
        """
        settings = self.settings
        generator = self._step_generator()
        eps = torch.randn(z.shape, generator=generator, device=self.device, dtype=z.dtype)
        t = sample_time(
            z.shape[0], settings.time_sampling, t_max=self.t_max, loc=settings.logit_normal_loc,
            scale=settings.logit_normal_scale, generator=generator, device=self.device,
        )
        eps, z = couple(eps, z, settings.coupling)

        with self._autocast():
            loss = cfm_loss(self.forward, z, eps, t, self.schedule)

        if self.world_size > 1:
            reported = loss.detach().clone()
            torch.distributed.all_reduce(reported)
            reported /= self.world_size
            value = float(reported)
        else:
            value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(self.step_count, value)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = self._clip_gradients()
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(self.step_count, value, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step_count += 1
        return value

    def _clip_gradients(self) -> float:
        """Return the gradient norm and scale the gradients down to ``grad_clip`` when the norm exceeds it.

        The gradients end as ``clip_grad_norm_`` leaves them. That function also multiplies
        them by a factor clamped to 1 when the norm is below the limit, which this skips.
        """
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        norm = float(total_norm)
        limit = self.settings.grad_clip
        # The factor is computed as clip_grads_with_norm_ computes it, so the test matches its clamp.
        if limit > 0 and math.isfinite(norm) and float(limit / (total_norm + 1e-6)) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(parameters, limit, total_norm)
        return norm

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        """Return everything needed to continue exactly: step, weights, EMA, optimiser, scheduler, RNG states."""
        state = {
            "step": self.step_count,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step_count = int(state["step"])


def schedule_config(name: str, *, n: float = 2.0, beta_min: float = 0.1, beta_max: float = 20.0) -> dict:
    """Return the keyword arguments of ``get_schedule`` as a plain dictionary for a model file."""
    return {"name": name, "n": float(n), "beta_min": float(beta_min), "beta_max": float(beta_max)}


def model_file_contents(trainer: Trainer, config: dict, schedule: dict, dataset: str) -> dict:
    """Return what a model file stores: config, schedule, step, weights and EMA weights."""
    return {
        "format": MODEL_FILE_FORMAT,
        "dataset": dataset,
        "config": dict(config),
        "schedule": dict(schedule),
        "step": trainer.step_count,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict()["shadow"],
    }


@dataclass
class LoadedModel:
    """A trained model with the EMA weights in eval mode, and the schedule it was trained with."""

    model: nn.Module
    schedule: Schedule
    schedule_config: dict
    config: dict
    dataset: str
    step: int


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file and return its EMA model and schedule.

    The parameters of the returned model do not require gradients, but its inputs
    still may (the instantaneous change of variables differentiates with respect
    to ``x``). Raises ``ValueError`` when the file is not a model file of this format.
    """
    contents = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(contents, dict) or contents.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"{path}: not a flow matching model file of format {MODEL_FILE_FORMAT}")
    model = build_model(contents["config"])
    model.load_state_dict(contents["ema"])
    model.to(map_location).eval()
    model.requires_grad_(False)
    schedule_kwargs = dict(contents["schedule"])
    schedule = get_schedule(schedule_kwargs.pop("name"), **schedule_kwargs)
    return LoadedModel(model, schedule, dict(contents["schedule"]), dict(contents["config"]), str(contents["dataset"]), int(contents["step"]))


def load_velocity_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Return the EMA model stored at ``path`` in eval mode (see ``load_model_file``)."""
    return load_model_file(path, map_location).model


def model_velocity(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]:
    """Adapt ``model(x, t)`` with ``t`` of shape ``(n,)`` to the solver signature ``f(x, t)``.

    ``t`` may be a float, a 0-d tensor or an ``(n,)`` tensor. ``x`` is cast to the
    model's dtype and the velocity is cast back to the dtype of ``x``.
    """
    dtype = next(model.parameters()).dtype

    def velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return model(x.to(dtype), t).to(x.dtype)

    return velocity
