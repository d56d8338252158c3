# Flywheel: `make run` brings up the whole stack and replays the corpus through it, `make test` runs every test.
# Both install what they need (venv, Python packages, system packages, Kafka jars, the corpus) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLYWHEEL := $(VENV)/bin/flywheel
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: run test lint setup venv system-deps lock bench eval dashboards clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: setup  ## the main job: the stack, the corpus replayed through it, then serving (RUN_ARGS=--quick|--serve-only)
	$(FLYWHEEL) run $(RUN_ARGS)

# pytest-xdist: one worker per module (its module fixtures, such as a running stack, start once), more workers than
# cores because most tests wait on servers; the tests that measure latency under their own load run after, alone.
TEST_WORKERS ?= 3

test: setup  ## every test: unit, integration (real Kafka, Prometheus, spamc), end-to-end
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadscope -m "not alone" $(PYTEST_ARGS)
	$(VENV)/bin/pytest -m alone $(PYTEST_ARGS)

lint: venv  ## ruff (lint rules) and mypy (types), configured in pyproject.toml; both must be clean
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy

setup: venv system-deps  ## venv + system packages + Kafka jars + corpus + seed model
	@$(PY) -m compileall -q -j 0 models services streams  # the project's own .pyc (only what changed since)
	$(FLYWHEEL) setup

venv: $(STAMP)  ## the full Python environment (every extra, from requirements.lock); idempotent

$(UV):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check uv

$(STAMP): pyproject.toml requirements.lock | $(UV)
	@echo "==> Python environment in $(VENV): every role's packages from requirements.lock (first time: torch's CUDA build, ~6 GB)"
	@# --compile-bytecode: every process (API, worker, test, CLI) then reads .pyc instead of compiling its imports from
	@# source, which it would do on every start where PYTHONDONTWRITEBYTECODE is set (about 3.5 s CPU per process here)
	$(UV) pip install --python $(PY) --compile-bytecode -r requirements.lock
	$(UV) pip install --python $(PY) --compile-bytecode --no-deps -e .
	@touch $(STAMP)

system-deps:  ## Debian packages: Java (broker), Maven (jars), npm (corpus), Prometheus, spamc, SpamAssassin rules, rspamd (bench speed)
	@bash deploy/system-deps.sh

lock: | $(UV)  ## re-pin after editing pyproject.toml: the full lock, then each role's lock as a subset of it
	$(UV) pip compile pyproject.toml --all-extras --python-version 3.11 -o requirements.lock
	$(UV) pip compile pyproject.toml --python-version 3.11 -c requirements.lock -o requirements-serve.lock
	$(UV) pip compile pyproject.toml --extra gpu --python-version 3.11 -c requirements.lock -o requirements-serve-gpu.lock

dashboards: venv  ## regenerate the Grafana dashboards' JSON (monitoring/grafana/dashboards/) from monitoring/grafana/flywheel_dashboard.py
	$(PY) monitoring/grafana/flywheel_dashboard.py

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
