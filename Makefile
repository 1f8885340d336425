# The README's commands. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LINT_DIRS := pipeline worker dashboard tests migrations $(wildcard bench) reliability

.PHONY: install run test lint bench clean reliability

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

# The OHIF viewer the dashboard serves at /ohif/: the pinned @ohif/app build, checksum checked,
# unpacked under var/ (a second run does nothing). Optional: when the registry cannot be reached
# everything else is installed and the dashboard says how to add the viewer later.
install: $(STAMP)
	@$(VENV)/bin/cxr-triage ohif install || echo "WARNING: the OHIF viewer is not installed (see above); everything else is. Later: $(VENV)/bin/cxr-triage ohif install" >&2

run: install
	$(VENV)/bin/cxr-triage run

test: install
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(VENV)/bin/cxr-triage bench

# The full reliability suite (64 min on 2 cores, 2026-12-04: 630 s partitions and a 20,000-study
# soak on each database): SQLite, and PostgreSQL too when one answers there.
RELIABILITY_PG ?= postgresql://postgres@127.0.0.1:5432/test
reliability: $(STAMP)
	$(VENV)/bin/cxr-triage reliability --database-url $(RELIABILITY_PG) --if-reachable

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy pipeline worker dashboard

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
