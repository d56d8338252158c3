# Flywheel: `make run` brings up the whole stack, `make test` runs every test.
# Both install what they need (venv, Python packages, system packages, Kafka jars, the corpus) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLYWHEEL := $(VENV)/bin/flywheel
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test setup venv system-deps lock bench eval clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: setup  ## the whole stack on local defaults (Ctrl-C stops it)
	$(FLYWHEEL) run

test: setup  ## every test: unit, integration (real Kafka, Prometheus, spamc), end-to-end
	$(VENV)/bin/pytest $(PYTEST_ARGS)

setup: venv system-deps  ## venv + system packages + Kafka jars + corpus + seed model
	$(FLYWHEEL) setup

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@echo "==> Python environment in $(VENV) (first time: torch's CUDA build, ~5 GB)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install --python $(PY) --no-deps -e .
	@touch $(STAMP)

system-deps:  ## Debian packages: Java (broker), Maven (jars), npm (corpus), Prometheus, spamc, SpamAssassin rules
	@bash deploy/system-deps.sh

lock:  ## re-resolve the pinned dependency files after editing pyproject.toml
	$(VENV)/bin/uv pip compile pyproject.toml --extra train --extra test --python-version 3.11 -o requirements.lock
	$(VENV)/bin/uv pip compile pyproject.toml --python-version 3.11 -o requirements-serve.lock

eval: setup  ## offline evaluation on both protocols, with the improvement curves
	$(FLYWHEEL) eval --protocol P1 --curves --json out/eval-P1.json
	$(FLYWHEEL) eval --protocol P2 --json out/eval-P2.json

bench: setup  ## the benchmarks (models, API, loop) with their JSON under out/
	$(FLYWHEEL) bench models --json out/bench-models.json
	$(FLYWHEEL) bench api --json out/bench-api.json
	$(FLYWHEEL) bench loop --json out/bench-loop.json

clean:  ## stop local servers and remove state (keeps downloads and the venv)
	-$(FLYWHEEL) kafka stop
	-$(FLYWHEEL) prometheus stop
	find var -mindepth 1 -maxdepth 1 ! -name downloads -exec rm -rf {} +
