# `make demo` and `make test` install into .venv when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/paser pretrain --preset battery-quick --run-dir $(DEMO_DIR)
	$(BIN)/paser train-policy --run-dir $(DEMO_DIR)
	$(BIN)/paser finetune --run-dir $(DEMO_DIR)
	$(BIN)/paser evaluate --run-dir $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check src tests

test: $(STAMP) lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
