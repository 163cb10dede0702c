# The two commands of the README: `make demo` and `make test`. Everything else is plumbing they call.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Slow-to-build parts (Kubernetes binaries, npm packages, helm/kubectl) are cached here by version.
export PILOTFLEET_CACHE ?= $(HOME)/.cache/pilotfleet

.PHONY: venv testbed-build lint test demo clean images

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

# The embedded default: a real fleet on this machine (SmolLM2-135M on CPU Triton behind the proxy) answering
# a completion, then the operator's side on the testbed (real Kubernetes, simulated GPU nodes).
demo: testbed-build
	$(BIN)/pilotfleet serve --once "def fibonacci(n):"
	$(BIN)/pilotfleet testbed demo

# The pilotfleet and pilotfleet-triton-cpu images (podman, no registry needed); prints their sizes.
images: venv
	$(BIN)/python -m pilotfleet_testbed.images_cli images build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
