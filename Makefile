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
	$(PY) -m flake8 bundle/scripts tumsyn_bundle tests bench apps
	$(PY) -m isort --check-only bundle/scripts tumsyn_bundle tests bench apps

# The model-zoo archive dist/<bundle name>_v<version>.zip (python -m monai.bundle download --url file://... installs it)
.PHONY: package
package: install
	cd bundle && $(abspath $(PY)) -m scripts.packaging --output_dir ../dist

# MONAI Label serving lives in its own environment: monailabel 0.8.5 pins numpy 1.x, jsonschema 3.x and pydicom 2.x,
# which the core install must not get. The pins below are the set that imports beside monai 1.6.1
# (shared design notes); SAM2_BUILD_CUDA=0 builds monailabel's sam2 dependency without CUDA kernels.
LABEL_VENV ?= .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python

.PHONY: label-env label-server test-label

$(LABEL_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install -q --upgrade pip
	$(LABEL_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 monai==1.6.1
	SAM2_BUILD_CUDA=0 $(LABEL_PY) -m pip install -q monailabel==0.8.5 numpy==1.26.4 jsonschema==3.2.0 \
		pydicom==2.4.4 dicomweb-client==0.59.1 pynetdicom==2.0.2 torch==2.14.1 torchvision==0.29.1 monai==1.6.1
	# the bundle's launcher (`tumsyn_bundle`) without the core pins, plus what inference needs (pip then
	# reports the core pins as unmet: expected in this environment)
	$(LABEL_PY) -m pip install -q --no-deps -e .
	$(LABEL_PY) -m pip install -q open_clip_torch==3.3.0 einops==0.8.2 nibabel==5.4.2 tqdm==4.70.1 fire==0.7.1 \
		matplotlib scipy pytest==9.2.0 numpy==1.26.4 torch==2.14.1 torchvision==0.29.1
	touch $@

label-env: $(LABEL_VENV)/.installed

# Serves apps/monailabel over the studies folder STUDIES on loopback only (127.0.0.1): the server has no
# authentication, so exposing it to a network is a deliberate, separate choice.
STUDIES ?= bundle/data/label_studies
LABEL_PORT ?= 8000
label-server: label-env
	PATH="$(abspath $(LABEL_VENV))/bin:$$PATH" monailabel start_server --app apps/monailabel --studies $(STUDIES) --host 127.0.0.1 --port $(LABEL_PORT)

# The app's tests in the server's environment: the served ones (marked slow, so outside `make test`) and the
# in-process ones; -m "" lifts the default "not slow" selection.
test-label: label-env
	$(LABEL_PY) -m pytest -q -m "" tests/test_monailabel.py
