# sparse-ingest developer targets. Everything runs from the project venv (.venv).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup install test check lint format demo stack-fetch stack-up stack-down stack-status \
	venv-torch test-torch

# Fresh machine: apt packages, .venv, Kafka/Elasticsearch artifacts, JDK check, default model.
setup:
	scripts/setup

# Fresh machine, tests: what CI runs (.ci/run): setup, lint, tests.
check: setup lint test

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'

# Starts its own Kafka + Elasticsearch for the session (see tests/conftest.py), or uses
# SPARSE_INGEST_TEST_KAFKA / SPARSE_INGEST_TEST_ES when set.
test:
	$(BIN)/pytest $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: setup
	$(BIN)/sparse-ingest demo

stack-fetch:
	$(BIN)/sparse-ingest stack fetch

stack-up:
	$(BIN)/sparse-ingest stack up $(STACK_ARGS)

stack-down:
	$(BIN)/sparse-ingest stack down $(STACK_ARGS)

stack-status:
	$(BIN)/sparse-ingest stack status $(STACK_ARGS)

# Optional, never needed to run or export: a second venv with PyTorch + transformers for the
# exporter's cross-check test and the PyTorch eager rows of bench/encoder_bench.py. PyPI's Linux
# torch wheel pulls the CUDA stack (~6 GB), hence its own venv under the cache, not .venv.
TORCH_VENV ?= $(HOME)/.cache/sparse-ingest/venv-torch
# Two steps: transformers >= 5.18 (the native GTE port) needs click >= 8.4.2 through
# huggingface-hub, and faust-streaming (dev extra, never imported here) caps click below 8.4, so
# one resolution of both fails; on top of the dev venv pip installs it with a warning.
venv-torch:
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet -e '.[dev]'
	$(TORCH_VENV)/bin/pip install --quiet -e '.[torch]'

test-torch: venv-torch
	$(TORCH_VENV)/bin/pytest -q tests/test_encoder_export.py tests/test_encoder_gte.py \
		tests/test_encoder.py
