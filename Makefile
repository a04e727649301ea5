# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
FASHION_DIR := /usr/share/datasets/fashion-mnist
FORTUNES_DIR := /usr/share/games/fortunes

.PHONY: setup system-deps test lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'
	touch $@

# Debian packages the project needs: Fashion-MNIST (the fashion-* tasks), fortunes (the text of
# fortunes-gpt) and Chromium (the report's browser test). Installed when missing, as root with
# apt-get; elsewhere a note says what is missing.
system-deps:
	@missing=""; \
	[ -d $(FASHION_DIR) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -f $(FORTUNES_DIR)/cookie ] || missing="$$missing fortunes"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing); \
	else echo "note: missing$$missing and apt-get unavailable: fashion-* and fortunes-gpt need data_dir, the browser test is skipped"; fi

setup: $(VENV)/.installed system-deps

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: setup lint
	$(BIN)/pytest -q

# The main job: test the classic claims on MNIST-1D (quick mode, about 3-5 minutes on 2 cores).
demo: setup
	$(BIN)/batchlab reproduce --quick --db demo.sqlite --out report

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
