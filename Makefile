# The two commands of the README: `make demo` and `make test`. Everything else is plumbing they call.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Slow-to-build parts (Kubernetes binaries, npm packages, helm/kubectl) are cached here by version.
export PILOTFLEET_CACHE ?= $(HOME)/.cache/pilotfleet

.PHONY: venv testbed-build lint test demo clean

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check pip==25.3
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/lock.txt -e ".[dev,triton,serve]"
	touch $@

venv: $(VENV)/.installed

testbed-build: venv
	$(BIN)/pilotfleet testbed build

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint testbed-build
	$(BIN)/pytest

demo: testbed-build
	$(BIN)/pilotfleet testbed demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
