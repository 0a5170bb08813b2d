"""Tests of the benchmark scripts in bench/: a CPU run of each with tiny settings, and their helpers.

bench_cpu.py needs the optional extra ``bench`` (torchcfm, flow-matching); its test runs
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


# Sizes that keep a run short should an invalid argument get past the checks.
TINY_GPU_RUN = ["--steps", "1", "--warmup", "0", "--batch-size", "2", "--channels", "8", "--no-compile"]


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:-1", "not a device"])
def test_gpu_script_rejects_unsupported_device(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(["--device", device, *TINY_GPU_RUN])

    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert "--device" in error_lines[0]
    assert repr(device) in error_lines[0]


@pytest.mark.parametrize("peak", ["-5", "0", "nan", "inf", "fast"])
def test_gpu_script_rejects_invalid_peak(peak, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(["--device", "cpu", "--peak-tflops", peak, *TINY_GPU_RUN])

    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert "--peak-tflops" in error_lines[0]
    assert "> 0" in error_lines[0]


def test_gpu_script_rejects_absent_cuda_index(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    code = bench_gpu.main(["--device", "cuda:2", *TINY_GPU_RUN])

    assert code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "--device cuda:2 not found" in error
    assert "cuda:0 to cuda:1" in error


@pytest.mark.parametrize(("device", "kind"), [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda")])
def test_gpu_device_argument_accepts(device, kind):
    assert bench_gpu.device_argument(device).type == kind


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


# Runs bench_cpu.py as __main__ with one module made unimportable: a None entry in
# sys.modules makes `import name` raise ModuleNotFoundError. The tiny settings keep
# the run short if the script reaches the benchmark anyway.
HIDE_MODULE = """
import runpy, sys
sys.modules[sys.argv[1]] = None
script = sys.argv[2]
sys.argv = [script, "--steps", "1", "--ot-steps", "1", "--seeds", "1", "--n-eval", "8", "--sample-n", "8", "--repeats", "1"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("module", ["flow_matching", "torchcfm"])
def test_cpu_script_without_extra_one_line(module):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", HIDE_MODULE, module, str(REPO / "bench" / "bench_cpu.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # Without the extra every benchmark-only module is missing, with it only the hidden one.
    missing = result.stderr.split("modules are missing: ", 1)[1].split(".", 1)[0].split(", ")
    assert module in missing
    assert "make bench" in result.stderr
    assert "pip install -e '.[bench]'" in result.stderr


def test_cpu_script_rejects_zero_steps():
    pytest.importorskip("torchcfm")
    result = run_script("bench_cpu.py", "--steps", "0")

    assert result.returncode == 2
    assert "--steps must be >= 1, got 0" in result.stderr
