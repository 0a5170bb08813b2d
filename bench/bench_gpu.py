"""GPU benchmark: U-Net training steps per second in bf16, eager and with torch.compile.

Trains ``flowmatch.models.UNet`` on random CIFAR-10-shaped data (3 x 32 x 32, uniform
in [-1, 1]) with ``flowmatch.training.Trainer`` (bf16 autocast, AdamW, clipping, EMA),
once eager and once with ``torch.compile``. The first ``--warmup`` steps of each run
are not timed, which also leaves compilation out. It prints steps and images per
second, and the achieved fraction of the GPU's dense bf16 peak. That fraction is the
FLOPs of one training step times steps per second, divided by the peak. The FLOPs are
those of the forward and backward pass, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the eager model.

Usage: ``python bench/bench_gpu.py [--steps 300] [--batch-size 128] [--channels 128]``.
Without CUDA it stops with one line. ``--device cpu --steps 2`` runs the same code
path on the CPU in float32 as a check of the script, with no peak fraction.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from flowmatch.models import UNet
from flowmatch.schedules import get_schedule
from flowmatch.training import Trainer, TrainSettings

SHAPE = (3, 32, 32)

# Dense bf16 Tensor Core peaks in TFLOPS, matched in this order against
# torch.cuda.get_device_name(). The values are from NVIDIA's data sheets, which print
# twice these figures under "with sparsity". H200 SXM has the compute of H100 SXM.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Return the dense bf16 peak of the GPU called ``device_name``, or ``None`` when the table lacks it."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def device_argument(text: str) -> torch.device:
    """Parse ``--device``: ``cuda``, ``cuda:N`` or ``cpu``, the devices this script has code paths for."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (expected cuda, cuda:N or cpu)")
    return device


def peak_argument(text: str) -> float:
    """Parse ``--peak-tflops``: a finite number of TFLOPS greater than 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"invalid peak {text!r} (expected a finite number of TFLOPS > 0)")
    return value


def make_trainer(channels: int, batch_size: int, steps: int, device: torch.device, bf16: bool, compile_model: bool) -> Trainer:
    torch.manual_seed(0)
    model = UNet(SHAPE, channels=channels).to(device)
    forward = torch.compile(model) if compile_model else model
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=2e-4, warmup_steps=10, grad_clip=1.0, ema_decay=0.999, bf16=bf16)
    return Trainer(model, get_schedule("linear"), settings, seed=0, forward=forward)


def step_flops(channels: int, batch: torch.Tensor, device: torch.device, bf16: bool) -> int:
    """Return the FLOPs that ``FlopCounterMode`` counts in one eager training step (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = make_trainer(channels, len(batch), 1, device, bf16, compile_model=False)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(batch)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, data: torch.Tensor, batch_size: int, warmup: int, steps: int, device: torch.device) -> float:
    """Return the training steps per second over ``steps`` steps after ``warmup`` untimed ones."""
    generator = torch.Generator(device="cpu").manual_seed(1)

    def batch() -> torch.Tensor:
        return data[torch.randint(len(data), (batch_size,), generator=generator).to(device)]

    for _ in range(warmup):
        trainer.step(batch())
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch())
    synchronize(device)
    return steps / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per run (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps before timing, compilation included (default 30)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--channels", type=int, default=128, help="U-Net base channels (default 128)")
    parser.add_argument("--device", type=device_argument, default="cuda", help="cuda (default), cuda:N, or cpu to check the script")
    parser.add_argument("--no-compile", action="store_true", help="run eager only")
    parser.add_argument("--peak-tflops", type=peak_argument, default=None, help="dense bf16 peak in TFLOPS (> 0), for a GPU missing from the table")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: a CUDA GPU is needed and PyTorch finds none; `--device cpu --steps 2` checks the script on the CPU", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        print(f"bench_gpu: --device {device} not found: PyTorch finds {count} CUDA device(s), cuda:0 to cuda:{count - 1}", file=sys.stderr)
        return 2
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops if args.peak_tflops is not None else peak_tflops(name)
        torch.backends.cudnn.benchmark = True
    else:
        name, peak = "CPU (script check, float32)", None

    data = torch.rand((max(4096, args.batch_size), *SHAPE), generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1).to(device)
    flops = step_flops(args.channels, data[: args.batch_size], device, bf16)
    print(f"bench_gpu: {name}, torch {torch.__version__}, U-Net channels {args.channels}, batch {args.batch_size} x {'x'.join(map(str, SHAPE))}, {'bf16 autocast' if bf16 else 'float32'}")
    print(f"FLOPs per training step (FlopCounterMode, forward + backward): {flops / 1e9:.2f} GFLOP")
    if peak is None and device.type == "cuda":
        print(f"dense bf16 peak of {name!r} is not in the table; pass --peak-tflops for the fraction of peak")
    elif peak is not None:
        source = "--peak-tflops" if args.peak_tflops is not None else "vendor data sheet"
        print(f"dense bf16 peak: {peak:.0f} TFLOPS ({source})")

    variants = [("eager", False)] + ([] if args.no_compile else [("torch.compile", True)])
    for label, compile_model in variants:
        trainer = make_trainer(args.channels, args.batch_size, args.warmup + args.steps, device, bf16, compile_model)
        rate = time_steps(trainer, data, args.batch_size, args.warmup, args.steps, device)
        achieved = flops * rate / 1e12
        fraction = f", {achieved / peak:.1%} of peak" if peak else ""
        print(f"{label:<14} {rate:9.2f} steps/s  {rate * args.batch_size:10.0f} images/s  {achieved:8.2f} TFLOP/s{fraction}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
