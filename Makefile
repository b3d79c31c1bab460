# Two commands do everything on a fresh machine:
#   make demo   - create .venv if needed, then train the CPU quick recipe on CIFAR-10 and print the eval accuracy
#   make test   - create .venv if needed, then run the test suite (what .ci/run calls)
# DATASET=path/to/cifar10 uses a local copy (e.g. DATASET=../shared/datasets/cifar10); the default is the Hub's.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml hf_vit/_jpeg_crop.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Plain pip on purpose: the pinned torch/torchvision wheels are on the build machines' disks.
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) -m hf_vit.demo $(if $(DATASET),--dataset_name $(DATASET)) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)
