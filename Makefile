# The README's two commands: `make repro` and `make test`. Both create the virtual
# environment first when it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# DVC must not reach for a host: no usage analytics, no update check.
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATER := 1

.PHONY: repro test venv

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
