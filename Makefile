# The project's commands.  `make test` and `make demo` work on a fresh Debian
# machine: they install what is missing (Debian packages, the virtualenv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all test check bench demo system clean

all: check test

system:
	@scripts/ensure-system.sh

$(STAMP): pyproject.toml scripts/ensure-system.sh
	@scripts/ensure-system.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	@touch $@

test: $(STAMP)
	$(PY) -m pytest

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench.run
	$(PY) -m bench.api
	$(PY) -m bench.swipe
	$(PY) -m bench.sync
	$(PY) -m bench.members

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
