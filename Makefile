# `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint unit bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/sn1-gateway serve --devnet

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(VENV)/.installed-test
	$(BIN)/pytest

test: lint unit

bench: $(VENV)/.installed
	$(BIN)/sn1-gateway bench

# docs/configuration.md is generated from the settings' metadata; tests/test_docs.py keeps it current.
docs: $(VENV)/.installed
	$(BIN)/python -m config.docs docs/configuration.md

# One executable file, no Python needed where it runs (packaging/). Rebuilt when a source changes.
.PHONY: binary
binary: dist/sn1-gateway

$(VENV)/.installed-build: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[build]'
	touch $(VENV)/.installed $@

dist/sn1-gateway: $(VENV)/.installed-build packaging/sn1-gateway.spec packaging/launcher.py \
		$(wildcard packaging/hooks/*.py) \
		$(shell find . -name '*.py' -not -path './.*' -not -path './tests/*' -not -path './build/*')
	PYTHON=$(BIN)/python bash packaging/build.sh

clean:
	rm -rf $(VENV) build *.egg-info
