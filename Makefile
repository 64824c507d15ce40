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
DEMO_STEPS ?= 200

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job until the federation lands: one data holder tunes a prompt for the bundled model on the
# bundled data under DP-SGD (epsilon = 8, delta = 1/(2n)), charging a fresh privacy ledger, and reports
# test accuracy beside the zero-shot model.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/fedprompt tune --model smollm2-135m --dataset rotten-tomatoes --steps $(DEMO_STEPS) \
		--dp --target-epsilon 8 --state $(DEMO_DIR)/state --budget-epsilon 10 --out $(DEMO_DIR)/prompt
	$(BIN)/fedprompt budget show --state $(DEMO_DIR)/state

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .test-cache runs
