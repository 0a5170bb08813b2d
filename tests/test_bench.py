"""Tests of the benchmark scripts in bench/: a CPU run of each with tiny settings, and their helpers.

bench_cpu.py needs the optional extra ``bench`` (torchcfm, flow-matching); its tests
are skipped where those are not installed. bench_gpu.py is checked on the CPU only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_gpu  # noqa: E402


def run_script(name: str, *arguments: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bench" / name), *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("device_name", "tflops"),
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce GTX 1080", None)],
)
def test_peak_table_lookup(device_name, tflops):
    assert bench_gpu.peak_tflops(device_name) == tflops


def test_step_flops_forward_and_backward():
    torch.manual_seed(0)
    batch = torch.rand(2, *bench_gpu.SHAPE) * 2 - 1
    model = bench_gpu.UNet(bench_gpu.SHAPE, channels=8)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(batch, torch.rand(2))
    forward = counter.get_total_flops()
    step = bench_gpu.step_flops(8, batch, torch.device("cpu"), bf16=False)

    # The backward pass of a convolution or matrix product costs twice its forward pass,
    # except the weight gradient alone where the input needs no gradient (the first layer).
    assert forward > 0
    assert 2.5 * forward < step <= 3 * forward


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_script_without_cuda_one_line():
    result = run_script("bench_gpu.py")

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "a CUDA GPU is needed" in result.stderr


def test_gpu_script_cpu_check_runs():
    result = run_script("bench_gpu.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--channels", "8", "--no-compile")

    assert result.returncode == 0, result.stderr[-2000:]
    assert "FLOPs per training step" in result.stdout
    assert "eager" in result.stdout
    assert "of peak" not in result.stdout


def test_cpu_script_tiny_run():
    pytest.importorskip("torchcfm")
    pytest.importorskip("flow_matching")
    result = run_script(
        "bench_cpu.py", "--steps", "4", "--ot-steps", "2", "--seeds", "2", "--n-eval", "64", "--sample-n", "64", "--repeats", "1", timeout=300
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "against torchcfm: speed ratio" in result.stdout
    assert "against flow_matching: speed ratio" in result.stdout
    assert "against torchcfm (ExactOT): speed ratio" in result.stdout
    assert "flow_matching (ODESolver)" in result.stdout


def test_cpu_script_rejects_zero_steps():
    pytest.importorskip("torchcfm")
    result = run_script("bench_cpu.py", "--steps", "0")

    assert result.returncode == 2
    assert "--steps must be >= 1, got 0" in result.stderr
