# The README's two commands: `make repro` and `make test`. Both create the virtual
# environment first when it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# DVC must not reach for a host: no usage analytics (the update check is off in .dvc/config).
export DVC_NO_ANALYTICS := 1
# Stage commands in dvc.yaml call `python`: make it the project's environment.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test venv metrics-check compare bench bench-gpu

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		echo "removing $(VENV): it is not a Python 3.11 environment"; rm -rf $(VENV); fi
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

# The metrics regression gate: fails and lists every metric in reports/metrics/ that got
# worse than at HEAD beyond its tolerance in metrics_tolerances.yaml.
metrics-check: $(STAMP)
	$(BIN)/python tools/metrics_check.py

# Writes reports/comparison.md and reports/figures/comparison_quality_vs_nfe.png from
# `dvc exp show --json`: the parameters that differ between experiments, headline
# metrics and quality against NFE.
compare: $(STAMP)
	$(BIN)/python tools/compare.py

# Benchmarks (docs/benchmarks.md). `make bench` trains the same network with this
# project's trainer, torchcfm and flow_matching on one CPU thread each; it installs the
# benchmark-only extra `bench` first. `make bench-gpu` times U-Net training on a CUDA GPU.
# Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="--steps 500".
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/bench_cpu.py $(BENCH_ARGS)

bench-gpu: $(STAMP)
	$(BIN)/python bench/bench_gpu.py $(BENCH_ARGS)
