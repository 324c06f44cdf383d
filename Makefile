# Needs only python3 and make: every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/dev.toml
USER_ID ?= dev
TENANT_ID ?= dev

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p workspace
	$(BIN)/codi2 run --config $(CONFIG) --user-id $(USER_ID) --tenant-id $(TENANT_ID)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/burst.py

clean:
	rm -rf $(VENV) workspace build dist *.egg-info .pytest_cache .ruff_cache
