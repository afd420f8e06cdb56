# The README's commands. Everything installs into ./.venv; nothing global is touched.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"

## One command: embedded PostgreSQL, sample data, two exports through Dagster, a summary.
demo: install
	$(BIN)/pulse-exports demo

## One command: the whole test suite against real PostgreSQL and real S3 (started from wheels).
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pulse
