"""The training building blocks other jobs share: dev prompts, base answers (of a patched model too), bf16 choice."""

import json

import pytest
import torch

from safetypatch.data.builtin import DEV_BENIGN, DEV_HARMFUL, resolve_prompts
from safetypatch.errors import DataError
from safetypatch.training.dev_checks import dev_prompts


def test_dev_prompts_take_the_dev_splits_spread_evenly():
    harmful, benign = dev_prompts(DEV_HARMFUL, DEV_BENIGN)
    assert harmful == resolve_prompts(DEV_HARMFUL, default_split="dev", response_field=None)
    assert benign == resolve_prompts(DEV_BENIGN, default_split="dev", response_field=None)
    h5, b5 = dev_prompts(DEV_HARMFUL, DEV_BENIGN, size=5)
    assert len(h5) == len(b5) == 5
    assert h5[0] == harmful[0] and h5[1] == harmful[int(len(harmful) / 5)]  # evenly spread, not the first five
    few, _ = dev_prompts(DEV_HARMFUL, DEV_BENIGN, size=10**6)
    assert few == harmful


def test_dev_prompts_read_a_file_by_its_prompt_field(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(4)))
    harmful, benign = dev_prompts(str(path), str(path), size=2, prompt_field="question")
    assert [r.prompt for r in harmful] == [r.prompt for r in benign] == ["q0", "q2"]


def test_dev_prompts_name_an_empty_side(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        dev_prompts(DEV_HARMFUL, str(empty))


def test_base_answers_of_a_patched_model_are_the_base_models(tiny_model, tiny_tok, benign_file):
    """A PEFT model answers with its adapter off: the same tokens as the bare model, and the same cache key."""
    from safetypatch.config import GenerationConfig, PatchShape
    from safetypatch.data import read_records
    from safetypatch.modeling import generate
    from safetypatch.patches import attach_new_patch
    from safetypatch.training.anchors import base_answers

    records = read_records(benign_file)[:3]
    bare = base_answers(tiny_model, tiny_tok, records, 6, cache=False)
    patched = attach_new_patch(tiny_model, PatchShape(rank=1, alpha=64.0, target_modules=["up_proj"], layers="all"))
    with torch.no_grad():
        for n, p in patched.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    own = generate(patched, tiny_tok, [r.chat() for r in records], GenerationConfig(max_new_tokens=6), progress=False)
    assert [g.token_ids for g in own] != [ids for ids, _ in bare]  # the adapter changes the answers
    assert base_answers(patched, tiny_tok, records, 6, cache=False) == bare
    cached = base_answers(patched, tiny_tok, records, 6)  # writes the cache under the base's fingerprint
    assert cached == bare


def test_use_bf16_follows_the_setting_or_the_device(monkeypatch):
    import safetypatch.modeling as modeling
    from safetypatch.training.config import use_bf16

    monkeypatch.setattr(modeling, "bf16_supported", lambda device: device == "cuda:0")
    assert use_bf16("yes", "cpu") and not use_bf16("no", "cuda:0")
    assert use_bf16("auto", "cuda:0") and not use_bf16("auto", "cpu")
