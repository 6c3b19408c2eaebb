# One command each. Every target installs what is missing first, so a fresh
# clone needs nothing but python3 (>= 3.11), and node (>= 20) with npm for the
# console and the JavaScript tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The console's chart library and the browser tests' driver, exactly as locked.
NPM_STAMP := frontend/node_modules/.installed-stamp
# The Kubernetes manifests' policy linter (tests/test_kubernetes.py), in a virtualenv of its
# own: checkov pins many libraries of its own, which must not move the project's.
CHECKOV_STAMP := $(VENV)/checkov/.installed-stamp

.PHONY: install run test lint format bench clean

$(STAMP): setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NPM_STAMP): frontend/package.json frontend/package-lock.json
	npm ci --prefix frontend --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

$(CHECKOV_STAMP): $(STAMP)
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet checkov==3.3.30
	touch $(CHECKOV_STAMP)

install: $(STAMP) $(NPM_STAMP) $(CHECKOV_STAMP)

run: $(STAMP) $(NPM_STAMP)
	$(PY) -m gateway dev --config config.toml

test: $(STAMP) $(NPM_STAMP) $(CHECKOV_STAMP)
	$(PY) -m pytest -q --cov --cov-report=term $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check gateway tests bench
	$(PY) -m ruff format --check gateway tests bench
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format gateway tests bench
	$(PY) -m ruff check --fix gateway tests bench

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .dev .mypy_cache .ruff_cache .pytest_cache *.egg-info frontend/node_modules artifacts
