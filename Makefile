# The two commands: `make demo` runs the end-to-end demo, `make test` runs everything CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup lint unit integration bench bench-all clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "mcpq needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Main job: embedded Redis, a worker, the demo server over stdio/HTTP/SSE, calls and results.
demo: $(BIN)/python
	$(BIN)/pip install -q -e . --config-settings editable_mode=strict
	$(BIN)/mcpq demo

setup: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,api,flower,otel,gateway]" --config-settings editable_mode=strict
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; }; } || echo "the metrics tests need prometheus and promtool: apt-get install -y prometheus"
	@command -v npm >/dev/null || { echo "npm (Node.js 20+) is needed for the server-everything tests"; exit 1; }
	npm ci --prefix tests/npm --no-audit --no-fund --loglevel=error

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p mcpq

# Everything: lint, unit and integration tests (a private redis-server is started by the tests).
test: lint
	$(BIN)/pytest -q

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

bench: setup
	$(BIN)/python -m bench.latency

# Every benchmark in docs/benchmarks.md (about 20 minutes on 2 cores).
bench-all: bench
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.throughput --tools '' --scaling --scaling-concurrency 2
	$(BIN)/python -m bench.roundtrips --calls 1000 --submit map
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.startup --runs 5
	$(BIN)/python -m bench.aio
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.observability

clean:
	rm -rf $(VENV) tests/npm/node_modules .pytest_cache .mypy_cache .ruff_cache *.egg-info
