# `make demo` and `make test` install into .venv when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_DATA ?= runs/data

.PHONY: demo test test-fast bench bench-gpu lint install clean

# PyTorch's Linux x86_64 wheels bring CUDA's libraries: about 6.5 GB in .venv, and pip
# keeps the downloaded wheels in its cache (often the same disk) for about 3 GB more;
# elsewhere under 3 in all. A first install checks the room first, rather than let pip
# stop half way with "No space left on device"; DISK_GB=0 skips the check.
DISK_GB ?= $(shell $(PY) -c "import platform; print(10 if platform.system() == 'Linux' and platform.machine() == 'x86_64' else 3)")

$(STAMP): pyproject.toml
	@ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1 || $(PY) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; sys.exit(0 if free >= $(DISK_GB) else f'make: installing into $(VENV) takes about $(DISK_GB) GB (PyTorch and its libraries) and {free:.1f} GB are free here: free some space, or run make DISK_GB=0 ... to try anyway')"
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
# pytest keeps the test modules it rewrote for its asserts (__pycache__, ignored by git), as
# it does wherever PYTHONDONTWRITEBYTECODE is unset: set, every worker rewrote every test
# module on every run (collection 16 s against 8 s on 2 cores)
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

test: $(STAMP) lint
	$(PYTEST) $(XDIST)

# the tests a developer runs between edits (under a minute): no process of its own, no ONNX
# export, no full run, no test that trains for more than about 1.5 s; `make test` (and CI)
# runs those too
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(XDIST)

clean:
	rm -rf $(VENV) runs
