# `make demo` and `make test` install into .venv when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_DATA ?= runs/data

.PHONY: demo test test-fast bench bench-gpu lint install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/paser run --preset battery-quick --run-dir $(DEMO_DIR) data.cache_dir=$(DEMO_DATA)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# one CUDA GPU, at most 8 minutes; writes benchmarks/results/cuda.json (docs/benchmarks.md)
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# One worker process per core (at most 4), each test on one thread (tests/conftest.py); a
# test file stays on one worker, so its module fixtures (a finished run, an export) are
# built once. `pytest` alone runs them in one process.
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP) lint
	$(BIN)/python -m pytest $(XDIST)

# the tests a developer runs between edits (under a minute): no process of its own, no ONNX
# export, no full run; `make test` (and CI) runs those too
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
