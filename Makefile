# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup test lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'
	touch $@

# Fashion-MNIST ships as a Debian package; install it when missing (needs root and apt-get).
$(FASHION_DIR):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else echo "note: $(FASHION_DIR) missing and apt-get unavailable; fashion-* tasks need --data-dir"; fi

setup: $(VENV)/.installed | $(FASHION_DIR)

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: setup lint
	$(BIN)/pytest -q

demo: setup
	$(BIN)/batchlab train --task mnist1d-mlp --batch-size 128 --lr 0.1 --optimizer sgd --momentum 0.9 --epochs 5

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
