# samvad developer tasks. Quick start: `make run`, `make test`.
#
# Variables (override on the command line or in the environment):
#   PYTHON       interpreter used to create .venv (default: first Python >= 3.11 found)
#   HOST, PORT   where `make run` listens (default 127.0.0.1:8080)
#   PYTEST_ARGS  extra arguments for pytest, e.g. PYTEST_ARGS='-k sessions -x'
#   BENCH_ARGS   extra arguments for `python -m bench`, e.g. BENCH_ARGS='--only http'
#   FIRESTORE_EMULATOR_HOST  use an emulator you started yourself instead of gcloud's

VENV        := .venv
VENV_PY     := $(VENV)/bin/python
VENV_STAMP  := $(VENV)/.samvad-dev-installed

HOST        ?= 127.0.0.1
PORT        ?= 8080
PYTEST_ARGS ?=
BENCH_ARGS  ?=

# First interpreter that is Python >= 3.11 (deferred: only evaluated when needed).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	if command -v $$p >/dev/null 2>&1 && \
	   $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	  command -v $$p; break; fi; done)

.DEFAULT_GOAL := help
.PHONY: help venv check-emulator run test lint fmt clean browser deploy bench FORCE

help:
	@echo "make run             run samvad on http://$(HOST):$(PORT) against a fresh Firestore emulator"
	@echo "make test            run the test suite (it starts its own emulator)"
	@echo "make lint            ruff check, ruff format --check, mypy"
	@echo "make fmt             ruff --fix and ruff format"
	@echo "make venv            create .venv and install samvad[dev] (again when pyproject.toml changes)"
	@echo "make check-emulator  check that the Firestore emulator (or FIRESTORE_EMULATOR_HOST) is available"
	@echo "make clean           remove .venv, caches and build output"
	@echo "make browser         install Debian's chromium for the dashboard test (needs root)"
	@echo "make deploy          deploy to Cloud Run: PROJECT=... REGION=... (deploy/deploy.sh)"
	@echo "make bench           benchmarks (~10-15 min): bench/results/latest.json, BENCHMARKS.md, plots"

venv: $(VENV_STAMP)

# Reinstalls when pyproject.toml is newer than the stamp; (re)creates .venv when
# its interpreter is missing or broken (e.g. the base Python was uninstalled).
$(VENV_STAMP): pyproject.toml $(shell test -x $(VENV_PY) || echo FORCE)
	@if ! $(VENV_PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	  py='$(PYTHON)'; \
	  if [ -z "$$py" ]; then \
	    echo "error: no Python >= 3.11 found; install python3.11 or set PYTHON=/path/to/python3" >&2; \
	    exit 1; \
	  fi; \
	  echo "creating $(VENV) with $$py ($$("$$py" --version 2>&1))"; \
	  rm -rf $(VENV); \
	  if ! "$$py" -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    echo "error: '$$py -m venv' failed; on Debian/Ubuntu install the venv module:" >&2; \
	    echo "  sudo apt-get install python3-venv   (or python3.11-venv)" >&2; \
	    exit 1; \
	  fi; \
	fi
	PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
	  $(VENV_PY) -m pip install --progress-bar off -e '.[dev]'
	@touch $@

FORCE:

# Uses only the standard library; -P keeps samvad/ itself off sys.path.
check-emulator:
	@py='$(PYTHON)'; \
	if [ -z "$$py" ]; then echo "error: no Python >= 3.11 found" >&2; exit 1; fi; \
	"$$py" -P samvad/emulator.py check

run: venv check-emulator
	HOST=$(HOST) PORT=$(PORT) SAMVAD_AUTH=none SAMVAD_ACCESS_LOG=$${SAMVAD_ACCESS_LOG:-all} \
	  $(VENV_PY) -m samvad.emulator run -- $(VENV_PY) -m samvad

# The test suite starts (or reuses, via FIRESTORE_EMULATOR_HOST) an emulator itself.
test: venv check-emulator
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The dashboard test drives a real headless Chromium (Playwright with Debian's build: Playwright's
# own browser download is not reachable from CI).
browser:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium fonts-liberation; \
	else \
	  echo "make browser: no apt-get here; install chromium at /usr/bin/chromium yourself" >&2; \
	fi

deploy:
	bash deploy/deploy.sh

# The bench extra (matplotlib, py-spy) on top of .[dev]; reinstalled when pyproject.toml changes.
$(VENV)/.samvad-bench-installed: $(VENV_STAMP)
	PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
	  $(VENV_PY) -m pip install --progress-bar off -e '.[dev,bench]'
	@touch $@

# Starts its own Firestore emulator (or uses FIRESTORE_EMULATOR_HOST); BENCH_ARGS='--quick'.
bench: $(VENV)/.samvad-bench-installed check-emulator
	$(VENV_PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache test-artifacts
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
