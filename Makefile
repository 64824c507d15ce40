# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each sets itself up on a fresh machine with only Python 3.11: a .venv, CPU torch first, then fedprompt.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedprompt-installed
# Extra pip arguments for torch alone, e.g. TORCH_PIP_ARGS="--index-url <a CPU wheel index>" where the
# default index would serve a CUDA build.
TORCH_PIP_ARGS ?=

DEMO_DIR ?= runs/demo

.PHONY: install demo demo-post test test-fast lint bench clean images images-test dev-holders flower-app

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: a coordinator and 3 data-holder daemons as real processes on loopback (TLS, node keys),
# 5 rounds of DP prompt tuning (epsilon = 8 per holder) on label-skewed splits of the bundled data, then
# each holder alone and a non-private pooled run for comparison; the report lands in $(DEMO_DIR)/report.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/fedprompt demo --out $(DEMO_DIR)

# POST: distil a student from smollm2-135m (or reuse the cached one), a private federation of 3 holders on the
# student, the transfer of its prompt back to the teacher; the report lands in $(DEMO_POST_DIR)/report.md.
DEMO_POST_DIR ?= runs/demo-post
demo-post: $(STAMP)
	rm -rf $(DEMO_POST_DIR)
	$(BIN)/fedprompt demo-post --out $(DEMO_POST_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked integration (real processes), slow (the bundled model),
# postgres and deploy (pyproject.toml lists the markers); make test runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow and not postgres and not deploy"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Container images of the three roles (deploy/docker/Dockerfile; the build context is this folder), built with
# this host's pip settings (index, wheel folder, CA bundle) as build arguments: deploy/docker/build.sh.
# BASE_IMAGE=... overrides the base image (make images-test makes one without a registry).
IMAGE_TAG ?= 0.1.0

images:
	bash deploy/docker/build.sh $(IMAGE_TAG)

# Builds the three images and runs a federation in containers (deploy/docker/images-test.sh): starts a Docker
# engine when none runs, makes the base image without a registry when none is reachable, removes what it made.
images-test:
	bash deploy/docker/images-test.sh

clean:
	rm -rf $(VENV) .test-cache runs

# The dev overlay's holders (deploy/k8s/overlays/dev/HOLDER/), each written from the one template there; list
# them in that overlay's kustomization.yaml. tests/deploy/test_deploy_k8s.py checks they match the template.
DEV_HOLDERS ?= holder-1 holder-2 holder-3
dev-holders:
	for h in $(DEV_HOLDERS); do \
		mkdir -p deploy/k8s/overlays/dev/$$h && \
		sed "s/{{holder}}/$$h/g" deploy/k8s/overlays/dev/holder.template.yaml > deploy/k8s/overlays/dev/$$h/kustomization.yaml; \
	done

# The Flower App's pyproject.toml, written from the federation's settings (server/coordinator/flower_app.py).
flower-app: $(STAMP)
	$(BIN)/python -m fedprompt.server.coordinator.flower_app

