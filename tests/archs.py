"""Tiny random causal LMs of many architectures, built in-process from a config (seconds each), for the
many-architecture tester and the speed-path checks. Every model has 2 (or `layers`) decoder layers, hidden size 32
and the tiny tokenizer's vocabulary (tests/support.py), and is returned in eval mode with dropout switched off
unless the caller asks for it.

ARCHITECTURES: the listed families of issue 17 (their module roles are in safetypatch's role table).
UNLISTED: architectures outside that table, patched through the naming conventions or refused with a clear message;
Granite scales its embeddings, residuals and logits (the trap the speed-path checks must catch)."""

from __future__ import annotations

from typing import Any, Callable

# (config class, model class, extra config fields); sizes and token ids are filled in by `build_arch`
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 16,
                                                      "final_logit_softcapping": 30.0,
                                                      "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 16,
                                                          "layer_types": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512,
                                                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"use_parallel_residual": True}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 64, "word_embed_proj_dim": 32, "dropout": 0.0,
                                             "enable_bias": True}),
}
UNLISTED_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                                         "logits_scaling": 8.0, "attention_multiplier": 0.125}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4,
                                                "n_positions": 512, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                "attn_pdrop": 0.0}),
    "phi": ("PhiConfig", "PhiForCausalLM", {"resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
}
ARCHITECTURES = list(_SPECS)
UNLISTED = list(UNLISTED_SPECS)

_COMMON = {"vocab_size": None, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def arch_config(name: str, tok: Any, layers: int = 2) -> Any:
    """The tiny config of architecture `name` (a key of ARCHITECTURES or UNLISTED) for tokenizer `tok`."""
    import transformers

    cfg_cls, _, extra = {**_SPECS, **UNLISTED_SPECS}[name]
    fields = dict(_COMMON, vocab_size=len(tok), num_hidden_layers=layers, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    if name in ("gpt2", "gptj"):
        fields["n_layer"] = layers
    fields.update({k: (layers if k == "n_layer" else v) for k, v in extra.items()})
    cls = getattr(transformers, cfg_cls)
    cfg = cls(**fields)
    if name == "gemma3":  # alternate sliding and full attention, as the real model does
        cfg.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return cfg


def build_arch(name: str, tok: Any, seed: int = 0, layers: int = 2) -> Any:
    """A tiny random model of architecture `name`, in eval mode, with pad_token_id set for generation."""
    import torch
    import transformers

    _, model_cls, _ = {**_SPECS, **UNLISTED_SPECS}[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(arch_config(name, tok, layers))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model


def save_arch(name: str, tok: Any, out: Any, seed: int = 0) -> Any:
    """Write a tiny model of `name` and the tokenizer to directory `out` (safetensors); returns `out`."""
    model = build_arch(name, tok, seed)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


BUILDERS: dict[str, Callable[..., Any]] = {n: (lambda tok, n=n, **kw: build_arch(n, tok, **kw))
                                           for n in ARCHITECTURES + UNLISTED}
