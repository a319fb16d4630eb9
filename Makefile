# The README's two commands: `make quickstart` and `make test`. Both create .venv when it is missing or stale.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.align-installed
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo gpu,dev || echo cpu,dev)

# Tests and CI: one thread per op (2 shared cores: torch's default threading slows small ops 10-40x), nothing
# from a model hub, and caches that outlive a clone.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_CACHE_DIR ?= $(HOME)/.cache/pip
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/align/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv quickstart test lint typecheck contracts unit clean

help:
	@echo "make quickstart  set up .venv and run the main job"
	@echo "make test        set up .venv and run lint, type checks, layer contracts and the test suite"

venv: $(STAMP)

$(STAMP): pyproject.toml tools/setup_venv.sh
	EXTRAS=$(EXTRAS) tools/setup_venv.sh
	touch $(STAMP)

quickstart: venv
	$(BIN)/align train recipes/quickstart.yaml

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

contracts: venv
	$(BIN)/lint-imports

# Two pytest processes on the two cores (tools/run_tests.sh): the Ray tests one after another in one, the rest in
# the other (two Ray sessions at once would share a temp dir and the cores).
unit: venv
	tools/run_tests.sh $(BIN)/pytest

test: lint typecheck contracts unit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
