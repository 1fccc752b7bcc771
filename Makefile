# Two commands on a fresh machine: `make demo` and `make test`. Each installs into .venv itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint soak bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py evtool/_fastlines.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) samples/demo.py

test: install
	sh tests/ensure_chromium.sh
	$(PY) -m ruff check evtool tests
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check evtool tests

soak: install
	$(PY) -m pytest -q -m soak

bench: install
	$(PY) -m tests.bench.run $(BENCH_ARGS)

clean:
	-$(VENV)/bin/evtool db stop 2>/dev/null
	rm -rf $(VENV) .evtool .pytest_cache .ruff_cache *.egg-info build dist server-events.jsonl
