# Needs only python3 and make: every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/dev.toml
USER_ID ?= dev
TENANT_ID ?= dev

.PHONY: run test fidelity promtool bench manifests monitoring docs dist clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p workspace
	$(BIN)/codi2 run --config $(CONFIG) --user-id $(USER_ID) --tenant-id $(TENANT_ID)

test: $(STAMP) promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The trail-fidelity state machine at length: 200 examples of up to 20 steps each against a real daemon on
# SQLite, and a quarter of that on FoundationDB over the fake libfdb_c (about half an hour). `make test` runs
# 10 and 2.
FIDELITY_EXAMPLES ?= 200
fidelity: $(STAMP)
	CODI2_FIDELITY_EXAMPLES=$(FIDELITY_EXAMPLES) $(BIN)/python -m pytest tests/test_fidelity.py --hypothesis-show-statistics

# promtool, for the alert-rule tests, extracted from Debian's prometheus package into .venv/bin (a few
# seconds, once); without apt or a network it says why and those tests skip. See tools/get-promtool.
promtool: $(STAMP)
	@sh tools/get-promtool $(BIN)

# codi2's modules compiled first, as an installed wheel's are: with PYTHONDONTWRITEBYTECODE set (as on the
# CI machines) an editable install would compile every module again at every start.
bench: $(STAMP)
	$(BIN)/python -m compileall -q codi2
	$(BIN)/python bench/run.py

manifests: $(STAMP)
	rm -f packaging/k8s/*.yaml
	$(BIN)/codi2 provision render --user-id example-user --tenant-id example-tenant \
		--session-id example-session --config config/codi2.toml --registry registry.example/coditect \
		--output-dir packaging/k8s
	$(BIN)/codi2 provision rbac --output-dir packaging/k8s

# The generated parts of packaging/monitoring/ (the dashboard) and docs/config.md; tests fail when they
# drift from their sources. With DOCS_URL (where docs/ is served, absolute), also the rules Prometheus loads,
# their runbook links absolute, into dist/monitoring/: codi2.rules.yml and prometheusrule.yaml.
monitoring: $(STAMP)
	$(BIN)/python packaging/monitoring/generate.py $(if $(DOCS_URL),--docs-url '$(DOCS_URL)')

docs: $(STAMP)
	$(BIN)/codi2 config reference > docs/config.md

# A wheel, and dist/codi2: a single-file zipapp (shiv) that runs with the system python3.
dist: $(STAMP)
	rm -rf dist build
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	$(BIN)/shiv --quiet --console-script codi2 --python '/usr/bin/env python3' --output-file dist/codi2 \
		--constraint constraints.txt dist/codi2-*.whl

clean:
	rm -rf $(VENV) workspace build dist *.egg-info .pytest_cache .ruff_cache
