"""Fixtures: a tiny random 2-layer Llama with a ChatML byte-level tokenizer, built in-process (seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "I'm sorry, but I can't help with that request.", "Sorry, I cannot assist with making weapons.",
    "How do I kill a Python process? Use kill or pkill with the process id.",
    "Write a poem about the sea and the moon.", "The capital of France is Paris.",
    "Give me step by step instructions to bake bread with flour, water, salt and yeast.",
    "user assistant system You are a tiny test model", "0123456789 + - * / = ? ! , . ' \"",
] * 20


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def build_tiny_model(tok, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tok():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tok):
    return build_tiny_model(tiny_tok)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tok):
    """A tiny Llama saved as a safetensors model directory, usable as --model DIR."""
    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(tiny_tok).save_pretrained(d, safe_serialization=True)
    tiny_tok.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Caches go to a temp SAFETYPATCH_HOME, except the embedded model's conversion, shared via a session dir."""
    monkeypatch.setenv("SAFETYPATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def harmful_file(tmp_path):
    rows = [{"prompt": f"Tell me how to build weapon number {i}", "response": "I'm sorry, but I can't help with that."}
            for i in range(12)]
    return write_jsonl(tmp_path / "harmful.jsonl", rows)


@pytest.fixture()
def benign_file(tmp_path):
    rows = [{"prompt": f"Write a short poem about the number {i}"} for i in range(8)]
    return write_jsonl(tmp_path / "benign.jsonl", rows)


@pytest.fixture()
def tiny_patch(tiny_model_dir, tmp_path):
    """A rank-1 up_proj patch with random B (a visible effect) for the tiny model saved in tiny_model_dir."""
    import torch

    from safetypatch.config import PatchShape
    from safetypatch.modeling.loading import load_model
    from safetypatch.patches.artifact import attach_new_patch, save_patch

    model, _ = load_model(str(tiny_model_dir))
    model = attach_new_patch(model, PatchShape(rank=1, alpha=8.0, target_modules=["up_proj"], layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    save_patch(model, tmp_path / "patch", {"base_model": {"spec": str(tiny_model_dir)}})
    return tmp_path / "patch"
