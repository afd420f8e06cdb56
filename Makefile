# The README's commands. Everything installs into ./.venv; nothing global is touched.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-bench install-test demo up test lint dev clean bench bench-full

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"

install-bench: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,bench]"

# The test suite runs the benchmark's 10k-row smoke test, which draws the benchmark's chart, and checks
# deploy/'s Kubernetes and Docker launcher configs against those launcher classes.
install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,bench,deploy]"

## One command: embedded PostgreSQL, sample data, two exports through Dagster, a summary.
demo: install
	$(BIN)/pulse-exports demo

## The whole system on loopback until Ctrl-C: Dagster code server, UI and daemon, and the product API.
up: install
	$(BIN)/pulse-exports dev

## One command: the whole test suite against real PostgreSQL and real S3 (started from wheels).
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pulse

## The benchmark (~15 min on 2 cores): psql \copy vs a naive worker vs pulse_exports end to end,
## 2M rows x 3 rounds plus 500k/1M scaling, written to docs/benchmarks.md and docs/img/.
bench: install-bench
	$(BIN)/python -m bench --scaling 500k,1M $(BENCH_ARGS)

## The same plus 10M rows of one tenant (seeds a 10M-row database first; ~25-35 min).
bench-full: install-bench
	$(BIN)/python -m bench --scaling 500k,1M,10M $(BENCH_ARGS)
