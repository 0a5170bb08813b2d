"""Train one data set's velocity model by conditional flow matching: ``python -m stages.train DATASET``.

Reads data/prepared/DATASET.npz (``train``) and params ``seed``, ``schedule``,
``schedules`` and ``train`` (with ``train.overrides.DATASET`` applied). Writes
data/models/DATASET/model.pt (EMA and raw weights, model config, schedule), the DVCLive
log reports/train/DATASET/ (loss and learning rate against the step) and
reports/timing/train_DATASET.json (seconds and rates only).

Checkpoints go to data/checkpoints/DATASET/checkpoint.pt every ``train.checkpoint_every``
steps. That folder is not a declared DVC output, so DVC leaves it in place, and a run
that was interrupted continues from its last checkpoint when the fingerprint matches.
The fingerprint is a hash of the parameters that change the result, the training data
file and the training code. Any other checkpoint is ignored and training starts over.
The checkpoint is deleted after a successful run, so a forced rerun trains from scratch.

With ``train.nproc > 1`` the stage starts itself again under ``torchrun --standalone``
with that many processes (DDP: NCCL on GPUs, Gloo on CPUs). Run by torchrun directly
(``WORLD_SIZE`` set), it joins that process group instead, which is how several nodes
are used. The data order is shared by all ranks and split between them, noise and
times are drawn per rank, and rank 0 writes every output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import flowmatch.coupling
import flowmatch.models
import flowmatch.paths
import flowmatch.schedules
import flowmatch.training
from flowmatch.models import build_model
from flowmatch.training import BatchOrder, NonFiniteGradientError, NonFiniteLossError, Trainer, TrainSettings, model_file_contents, schedule_config, shard
from stages.common import ParamError, StageError, atomic_directory, load_npz, run_stage, save_torch, seed_everything, write_json
from stages.config import DATASETS, Params, TrainParams, load_params

log = logging.getLogger("flowmatch.train")

PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("data/models")
CHECKPOINT_DIR = Path("data/checkpoints")
LIVE_DIR = Path("reports/train")
TIMING_DIR = Path("reports/timing")

# Size of the sinusoidal time embedding of both model kinds.
TIME_EMBEDDING_DIM = 32

# Parameters that do not change the trained weights, left out of the fingerprint.
NOT_IN_FINGERPRINT = ("checkpoint_every", "log_every", "nproc", "overrides")

# Modules whose code the trained weights depend on; a change to any of them invalidates checkpoints.
CODE_MODULES = (flowmatch.schedules, flowmatch.paths, flowmatch.models, flowmatch.coupling, flowmatch.training, sys.modules[__name__])


def parse_dataset_argument(argv: list[str], stage: str) -> str:
    """Return the data set named by the only command-line argument; raise ``StageError`` otherwise."""
    if len(argv) != 1 or argv[0] not in DATASETS:
        got = " ".join(argv) if argv else "no argument"
        raise StageError(f"usage: python -m stages.{stage} DATASET with DATASET one of {', '.join(DATASETS)}; got {got}")
    return argv[0]


def resolve_device(requested: str) -> torch.device:
    """Return the device for ``train.device``: ``auto`` picks CUDA when available."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamError("train.device", requested, "auto or cpu: PyTorch finds no CUDA device here")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def model_config(settings: TrainParams, shape: tuple[int, ...], dataset: str) -> dict:
    """Return the ``build_model`` config for ``settings.model`` on samples of ``shape``."""
    if settings.model == "mlp":
        return {"kind": "mlp", "shape": list(shape), "hidden": settings.hidden, "layers": settings.layers, "time_dim": TIME_EMBEDDING_DIM}
    if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
        raise ParamError("train.model", settings.model, f"mlp for {dataset}: unet needs images (channels, height, width) with even sides, got shape {list(shape)}")
    return {"kind": "unet", "shape": list(shape), "channels": settings.channels, "time_dim": TIME_EMBEDDING_DIM}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(dataset: str, params: Params, settings: TrainParams, world_size: int, data_path: Path) -> str:
    """Return a hash of everything that determines the trained weights.

    That is the data set, the seed, the schedule, the training parameters that change
    the result, the process count (noise is drawn per rank), the data file and the
    training code.
    """
    train = {key: value for key, value in dataclasses.asdict(settings).items() if key not in NOT_IN_FINGERPRINT}
    record = {
        "dataset": dataset,
        "seed": params.seed,
        "schedule": dataclasses.asdict(params.schedule),
        "train": train,
        "world_size": world_size,
        "data": file_sha256(data_path),
        "code": {module.__name__: file_sha256(Path(module.__file__)) for module in CODE_MODULES},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def load_training_data(dataset: str) -> np.ndarray:
    path = PREPARED_DIR / f"{dataset}.npz"
    arrays = load_npz(path)
    if "train" not in arrays:
        raise StageError(f"{path}: no 'train' array; rerun the prepare stage (dvc repro prepare)")
    train = arrays["train"].astype(np.float32)
    if train.ndim < 2 or len(train) < 1:
        raise StageError(f"{path}: 'train' must have shape (n, ...) with n >= 1, got {train.shape}")
    if not np.isfinite(train).all():
        raise StageError(f"{path}: 'train' contains {int((~np.isfinite(train)).sum())} non-finite values")
    return train


class DistributedContext:
    """The process group of a torchrun launch, or a single process without one."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend=backend)
            log.info("rank %d of %d joined the %s process group", self.rank, self.world_size, backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: object) -> object:
        """Return rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0, device=self.device if self.device.type == "cuda" else None)
        return holder[0]

    def check_replicas(self, model: torch.nn.Module) -> None:
        """Raise ``StageError`` unless every rank has the same weights as rank 0.

        DDP keeps replicas identical by averaging gradients. A mismatch means that the
        gradient all-reduce did not take place, and then rank 0's model saw only its share of the data.
        """
        if self.world_size == 1:
            return
        weights = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        reference = weights.clone()
        torch.distributed.broadcast(reference, src=0)
        mismatches = (weights != reference).sum().reshape(1)
        torch.distributed.all_reduce(mismatches)
        if int(mismatches) > 0:
            raise StageError(f"the {self.world_size} training processes ended with different weights ({int(mismatches)} values differ)")
        log.info("all %d ranks have identical weights", self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class TrainingLog:
    """The DVCLive log of one run, a context manager: loss and learning rate, rank 0 only.

    The records logged so far are also kept in ``history`` and stored with each
    checkpoint. A resumed run starts a fresh DVCLive directory and writes that
    history again, so the log never contains steps that the checkpoint does not.
    DVCLive writes into a temporary directory next to ``directory`` (watch it while
    training runs), which replaces ``directory`` when the block ends without an error.
    """

    def __init__(self, directory: Path, history: list[dict], enabled: bool):
        self.directory = directory
        self.history = list(history)
        self.enabled = enabled
        self.live = None
        self._staging = contextlib.ExitStack()

    def __enter__(self) -> TrainingLog:
        if not self.enabled:
            return self
        # The log stays local: DVCLive would otherwise post to DVC Studio when a token is configured.
        os.environ["DVC_STUDIO_OFFLINE"] = "true"
        from dvclive import Live

        with contextlib.ExitStack() as stack:
            staging = stack.enter_context(atomic_directory(self.directory))
            log.info("training log in %s until the run ends, then in %s", staging, self.directory)
            # dvcyaml=None: the plots are declared in the project's dvc.yaml, so DVCLive
            # writes no dvc.yaml of its own. save_dvc_exp=False: it never commits.
            self.live = Live(dir=str(staging), dvcyaml=None, save_dvc_exp=False, report=None)
            for record in self.history:
                self._write(record)
            self._staging = stack.pop_all()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self.live is not None and kind is None:
            self.live.make_summary()
            self.live.end()
        return self._staging.__exit__(kind, error, traceback)

    def _write(self, record: dict) -> None:
        self.live.step = record["step"]
        # Throughput stays out of the DVCLive files: they are declared outputs, and a rerun
        # must reproduce them byte for byte. It is in reports/timing/train_DATASET.json.
        for name in ("loss", "lr"):
            self.live.log_metric(name, record[name])

    def add(self, record: dict) -> None:
        self.history.append(record)
        if self.live is not None:
            self._write(record)


def load_checkpoint(path: Path, expected: str) -> dict | None:
    """Return the checkpoint at ``path`` if its fingerprint is ``expected``, else ``None``."""
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        log.warning("%s: cannot read the checkpoint (%s: %s); training starts over", path, type(error).__name__, error)
        return None
    if not isinstance(checkpoint, dict) or checkpoint.get("fingerprint") != expected:
        log.info("%s: parameters, data or code changed since this checkpoint; training starts over", path)
        return None
    return checkpoint


def relaunch_with_torchrun(dataset: str, nproc: int) -> None:
    """Run this stage again under ``torchrun --standalone`` with ``nproc`` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "stages.train", dataset]
    log.info("starting %d training processes: %s", nproc, " ".join(command))
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise StageError(f"the {nproc} training processes failed with exit code {completed.returncode}; see the messages above")


def train(dataset: str, params: Params, settings: TrainParams) -> None:
    """Train ``dataset``'s model and write its outputs (rank 0)."""
    data_path = PREPARED_DIR / f"{dataset}.npz"
    train_data = load_training_data(dataset)
    shape = tuple(train_data.shape[1:])
    config = model_config(settings, shape, dataset)

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    # NOTE: the tests run on CPUs only (Gloo). The CUDA paths (NCCL, bf16 autocast, CUDA
    # generators and RNG state in checkpoints) have not been run.
    device = resolve_device(settings.device)
    bf16 = settings.precision == "bf16"
    if bf16 and device.type != "cuda":
        log.warning("train.precision bf16 uses autocast on CUDA only; training in fp32 on %s", device)
        bf16 = False
    context = DistributedContext(device)
    try:
        _train_in_context(dataset, params, settings, context, train_data, data_path, config, bf16)
    finally:
        context.close()


def _train_in_context(dataset, params, settings, context, train_data, data_path, config, bf16):
    device = context.device
    expected = fingerprint(dataset, params, settings, context.world_size, data_path)
    checkpoint_path = CHECKPOINT_DIR / dataset / "checkpoint.pt"
    checkpoint = context.broadcast(load_checkpoint(checkpoint_path, expected) if context.is_main else None)

    seed_everything(params.seed)
    model = build_model(config).to(device)
    forward = model
    if context.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        forward = torch.compile(forward)

    schedule = params.schedule.build()
    trainer = Trainer(
        model,
        schedule,
        TrainSettings(
            steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, warmup_steps=settings.warmup_steps,
            grad_clip=settings.grad_clip, ema_decay=settings.ema_decay, time_sampling=settings.time_sampling,
            logit_normal_loc=settings.logit_normal_loc, logit_normal_scale=settings.logit_normal_scale,
            coupling=settings.coupling, bf16=bf16,
        ),
        seed=params.seed,
        rank=context.rank,
        world_size=context.world_size,
        forward=forward,
    )
    history: list[dict] = []
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint["trainer"])
            history = checkpoint["history"]
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            # The fingerprint matched, so the file was altered or written by other code.
            detail = " ".join(str(error).split())
            raise StageError(
                f"{checkpoint_path}: cannot resume from the checkpoint, it does not fit the model "
                f"({type(error).__name__}: {detail[:300]}); delete it and rerun"
            ) from error
        log.info("resuming %s from step %d of %d (%s)", dataset, trainer.step_count, settings.steps, checkpoint_path)
    start_step = trainer.step_count
    checkpoint_step = start_step if checkpoint is not None else None

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s: %d examples of shape %s, %s model with %d parameters, schedule %s, %d steps of batch %d on %s x %d",
        dataset, len(train_data), list(train_data.shape[1:]), config["kind"], n_params, schedule.name,
        settings.steps, settings.batch_size, device, context.world_size,
    )
    data = torch.from_numpy(train_data).to(device)
    order = BatchOrder(len(train_data), settings.batch_size, params.seed)
    with TrainingLog(LIVE_DIR / dataset, history, enabled=context.is_main) as training_log:
        progress = tqdm(total=settings.steps, initial=start_step, desc=f"train {dataset}", unit="step", disable=not context.is_main, dynamic_ncols=True)
        window_losses: list[float] = []
        window_start = time.perf_counter()
        run_start = window_start
        try:
            while trainer.step_count < settings.steps:
                step = trainer.step_count
                indices = torch.from_numpy(shard(order.indices(step), context.rank, context.world_size)).to(device)
                window_losses.append(trainer.step(data[indices]))
                progress.update(1)

                done = trainer.step_count
                if done % settings.log_every == 0 or done == settings.steps:
                    now = time.perf_counter()
                    record = {
                        "step": done,
                        "loss": float(np.mean(window_losses)),
                        "lr": trainer.lr,
                        "samples_per_second": len(window_losses) * settings.batch_size / max(now - window_start, 1e-9),
                    }
                    training_log.add(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                    window_losses.clear()
                    window_start = now
                if done % settings.checkpoint_every == 0 and done < settings.steps and context.is_main:
                    save_torch(checkpoint_path, {"fingerprint": expected, "trainer": trainer.state_dict(), "history": training_log.history})
                    checkpoint_step = done
        except (NonFiniteLossError, NonFiniteGradientError) as error:
            if isinstance(error, NonFiniteLossError):
                found = f"the loss is {error.loss}"
            else:
                found = f"the gradient norm is {error.norm} while the loss is {error.loss:.4g}, so the backward pass overflowed"
            kept = f"the last checkpoint (step {checkpoint_step}) is kept in {checkpoint_path}" if checkpoint_step is not None else "no checkpoint was written"
            raise StageError(
                f"training of {dataset} stopped at step {error.step}: {found}, most likely because the learning rate is too high "
                f"for this model; {kept}; lower train.lr or raise train.warmup_steps and rerun"
            ) from error
        finally:
            progress.close()
        seconds = time.perf_counter() - run_start
        context.check_replicas(model)

        if context.is_main:
            _write_outputs(dataset, params, trainer, config, training_log, seconds, start_step, settings)
    # The checkpoint is deleted only after the model and the log are in place.
    if context.is_main:
        checkpoint_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            checkpoint_path.parent.rmdir()
    context.barrier()


def _write_outputs(dataset, params, trainer, config, training_log, seconds, start_step, settings):
    schedule = params.schedule
    contents = model_file_contents(
        trainer, config, schedule_config(schedule.name, n=schedule.polynomial_n, beta_min=schedule.vp_beta_min, beta_max=schedule.vp_beta_max), dataset
    )
    model_path = MODEL_DIR / dataset / "model.pt"
    save_torch(model_path, contents)

    steps_run = trainer.step_count - start_step
    rate = steps_run / seconds if seconds > 0 else 0.0
    timing = {
        "seconds": round(seconds, 3),
        "steps": steps_run,
        "start_step": start_step,
        "steps_per_second": round(rate, 3),
        "samples_per_second": round(rate * settings.batch_size, 1),
    }
    timing_path = TIMING_DIR / f"train_{dataset}.json"
    write_json(timing_path, timing)
    final_loss = training_log.history[-1]["loss"] if training_log.history else float("nan")
    log.info("wrote %s (final loss %.4f) and %s (%.1f s, %.1f steps/s)", model_path, final_loss, timing_path, seconds, rate)


def main() -> None:
    params = load_params()
    dataset = parse_dataset_argument(sys.argv[1:], "train")
    settings = params.train.for_dataset(dataset)
    if settings.nproc > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_with_torchrun(dataset, settings.nproc)
        return
    train(dataset, params, settings)


if __name__ == "__main__":
    run_stage(main)
