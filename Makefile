# Developer entry points. Every target that needs Python depends on `venv`, so a fresh clone
# needs nothing but python3.11 and PyPI: `make demo`, `make test`, `make lint`.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; reinstalls when pyproject.toml changes.
STAMP := $(VENV)/.maskd-installed

.PHONY: venv demo test test-fast lint wheel-check

venv: $(STAMP)

# setuptools is installed first and the project built without isolation, so an already
# complete environment reinstalls without touching the network.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip>=24" "setuptools>=77"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[worker,dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/maskd demo

test: venv
	$(BIN)/pytest

# Everything but the tests marked slow (training runs, worker subprocesses, wheel builds).
test-fast: venv
	$(BIN)/pytest -m "not slow"

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The built wheel in fresh environments, away from the source tree: the bare client without
# torch, then `maskd[worker]` migrating, serving and running the demo (minutes: it installs torch).
wheel-check:
	.ci/wheel-check
