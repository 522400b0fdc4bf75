"""Fixtures: a tiny random 2-layer Llama with a ChatML byte-level tokenizer (tests/support.py), its saved
directory, a patch for it, small data files, and an isolated SAFETYPATCH_HOME for every test."""

from __future__ import annotations

import os

import pytest
from support import build_tiny_model, build_tiny_tokenizer, write_jsonl


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
