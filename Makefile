# Set-up and everyday commands. Every target creates the virtualenv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install test lint demo airflow bench sandbox warehouse clean browser postgres redis celery

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

## Debian's headless Chromium and its driver for the browser test (root + apt-get, as in CI)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing chromium and chromium-driver (Debian packages) for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium/chromedriver missing and cannot install them: the browser test will be skipped"; fi; \
	fi

## Debian's PostgreSQL server binaries for the SQL-connection export state tests (the tests start a
## throw-away server with initdb in a temporary directory; nothing runs as a system service)
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing postgresql (Debian package) for the PostgreSQL export state tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL server binaries missing and cannot install them: the PostgreSQL tests will be skipped"; fi; \
	fi

## Debian's Redis server for the Celery deployment test and `make celery` (the Celery broker; started on a
## free port in a temporary directory, not as a system service)
redis:
	@if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing redis-server (Debian package) for the Celery deployment test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server missing and cannot install it: the Celery deployment test will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check airflow_provider_segexport dags tests

## make test: lint + the whole test suite (unit, sandbox, DAG runs, browser, PostgreSQL export state, the
## CeleryExecutor deployment with a worker killed mid-export)
test: $(STAMP) lint browser postgres redis
	$(BIN)/pytest $(PYTEST_ARGS)

## make demo: sample warehouse + sandbox + `airflow dags test segment_export`, then a report
demo: $(STAMP)
	$(BIN)/python -m airflow_provider_segexport.demo

## make airflow: the same set-up, then `airflow standalone` (UI on http://localhost:8080)
airflow: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m airflow_provider_segexport.demo --standalone

## make celery: docker-compose.yaml without Docker: PostgreSQL, Redis, the sandbox and Airflow's api-server,
## scheduler, dag-processor, triggerer and two Celery workers as local processes; prints the UI's URL
celery: $(STAMP) postgres redis
	$(BIN)/python -m tests.celery_deployment $(CELERY_ARGS)

## make sandbox: run the vendor sandbox in the foreground
sandbox: $(STAMP)
	$(BIN)/segexport-sandbox --port 8443

## make bench: long benchmarks (1,000,000 profiles)
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache build dist
