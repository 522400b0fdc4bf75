"""Generation backends: transformers matches `generate`; vLLM without vLLM installed is a clear error."""

from __future__ import annotations

import sys

import pytest

from safetypatch.config import GenerationConfig
from safetypatch.errors import BackendError
from safetypatch.modeling.backends import TransformersBackend, VLLMBackend, get_backend, vllm_lora_rank
from safetypatch.modeling import generate
from safetypatch.errors import ModelError

PROMPTS = ["Write a poem about the sea.", "How do I kill a Python process?", "Hi",
           [{"role": "user", "content": "The capital of France is"}]]


@pytest.fixture()
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not


def test_vllm_missing_is_a_clear_error(no_vllm):
    for make in (lambda: get_backend("vllm"), lambda: get_backend("VLLM", model="default", patch="p"),
                 lambda: VLLMBackend()):
        with pytest.raises(BackendError) as e:
            make()
        assert isinstance(e.value, ModelError)  # the CLI prints ModelError as one line, without a traceback
        assert "not installed" in str(e.value) and "pip install 'safetypatch[vllm]'" in str(e.value)


def test_unknown_backend():
    with pytest.raises(BackendError, match="unknown generation backend 'tgi'; available: \\['transformers', 'vllm'\\]"):
        get_backend("tgi")


def test_transformers_backend_matches_generate_greedy(tiny_model, tiny_tok):
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    want = generate(tiny_model, tiny_tok, PROMPTS, cfg, progress=False)
    for backend in (TransformersBackend(tiny_model, tiny_tok), get_backend("hf", model=tiny_model, tok=tiny_tok)):
        assert backend.name == "transformers"
        assert backend.generate(PROMPTS, cfg, progress=False) == want


def test_transformers_backend_sampling_is_seeded(tiny_model, tiny_tok):
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4, do_sample=True, temperature=1.0, seed=7)
    backend = get_backend("transformers", model=tiny_model, tok=tiny_tok)
    a = backend.generate(PROMPTS, cfg, progress=False)
    assert a == backend.generate(PROMPTS, cfg, progress=False)
    assert a == generate(tiny_model, tiny_tok, PROMPTS, cfg, progress=False)


def test_transformers_backend_patch_off(tiny_model, tiny_tok):
    from peft import LoraConfig, get_peft_model

    cfg = GenerationConfig(max_new_tokens=6)
    base = generate(tiny_model, tiny_tok, PROMPTS, cfg, progress=False)
    peft = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    backend = TransformersBackend(peft, tiny_tok)
    assert backend.generate(PROMPTS, cfg, variant="base", progress=False) == base


def test_transformers_backend_needs_tokenizer(tiny_model):
    with pytest.raises(BackendError, match="needs its tokenizer"):
        TransformersBackend(tiny_model)


def test_vllm_lora_rank():
    assert vllm_lora_rank(1) == 8 and vllm_lora_rank(8) == 8 and vllm_lora_rank(9) == 16
    assert vllm_lora_rank(300) == 320
    with pytest.raises(BackendError, match="above vLLM's largest"):
        vllm_lora_rank(1024)
