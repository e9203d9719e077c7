# One Makefile for local work and CI. `make demo` and `make test` need nothing pre-installed
# but python3 (>= 3.11): they create .venv and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/flowctl demo

lint: install
	$(BIN)/ruff check flow_orchestrator tests bench
	$(BIN)/ruff format --check flow_orchestrator tests bench

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: lint typecheck unit

# The suite (W1-W4 on one server and on a 3-node cluster, beside the floors) and the memory figure;
# see docs/performance.md. The chart needs matplotlib (the `bench` extra).
bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.suite
	$(BIN)/python -m bench.memory

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
