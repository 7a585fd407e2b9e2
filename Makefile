# The project's commands.  `make test` and `make demo` work on a fresh Debian
# machine: they install what is missing (Debian packages, the virtualenv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all test check bench soak fuzz demo system clean

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
	$(PY) -m bench.suite

# The long fault soak: lanes selling through kills, broker restarts, head-office
# outages and a full disk (docs/reliability.md).  make test runs a short form.
soak: $(STAMP)
	$(PY) tests/soak.py --long

# The long fuzzing run: the same fuzz tests as make test with many more examples.
fuzz: $(STAMP)
	LANE_FUZZ=long $(PY) -m pytest -p no:cacheprovider tests/test_fuzz_pos_api.py tests/test_fuzz_hq_mqtt.py tests/test_fuzz_decoders.py

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
