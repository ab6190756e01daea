# Set-up-and-go entry points; README.md's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-slow lint

# A virtual environment created on first use and reused after; reinstalled when the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m monai.bundle run --config_file bundle/configs/inference.yaml

test: install
	$(PY) -m pytest -q -n 2 --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow --durations=15

lint: install
	$(PY) -m pip install -q flake8 isort
	$(PY) -m flake8 bundle/scripts tests bench
	$(PY) -m isort --check-only bundle/scripts tests bench
