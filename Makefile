# One command each for a fresh machine: `make test` and `make demo` create the virtual environment
# and install everything themselves. torch is pinned first to the CPU build that this project is
# developed against; every other requirement is a range that torch 2.13.0 satisfies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo bench bench-smoke report clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cli,bench,integrations,dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples docs/api.py
	$(BIN)/ruff format --check src tests examples docs/api.py

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest bench-smoke

demo: $(STAMP)
	$(BIN)/selftune demo

bench: $(STAMP)
	$(BIN)/selftune bench --suite full --readme README.md

bench-smoke: $(STAMP)
	$(BIN)/selftune bench --suite smoke --out bench-results-smoke --no-report

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
