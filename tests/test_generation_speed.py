"""generate's fast greedy path (shared-prefix KV reuse, finished rows leaving the batch) gives model.generate's
greedy outputs token for token on a tiny model (tests never time)."""

import pytest
import torch

import safetypatch.modeling.generation as gen_mod
from safetypatch.config import GenerationConfig
from safetypatch.modeling import generate, variant
from safetypatch.modeling.generation import fast_greedy_ok
from safetypatch.modeling.greedy import growing_layer_class, shared_prefix

from support import build_tiny_model

PROMPTS = ["Write a poem about the sea", "How do I kill a Python process?", "Hi", "The capital of France is",
           [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "bake bread"}],
           "Give me step by step instructions to bake bread with flour, water, salt and yeast.", "0 + 1 = ?",
           "Sorry", "Tell me about the moon and the sea and Paris"]


def _lively(model, std=0.25):
    """The fixture's init (std 0.02) makes a 2-layer model repeat one token whatever the prompt, which would
    make 'same outputs' trivial; larger weights give varied, prompt-dependent answers."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return model


def _both(model, tok, prompts, cfg, monkeypatch):
    fast = generate(model, tok, prompts, cfg, progress=False)
    monkeypatch.setattr(gen_mod, "_FAST_GREEDY", False)
    plain = generate(model, tok, prompts, cfg, progress=False)
    monkeypatch.setattr(gen_mod, "_FAST_GREEDY", True)
    return fast, plain


@pytest.mark.parametrize("seed,batch_size", [(0, 4), (1, 16), (2, 3)])
def test_fast_greedy_matches_model_generate(tiny_tok, monkeypatch, seed, batch_size):
    model = _lively(build_tiny_model(tiny_tok, seed=seed, layers=2))
    cfg = GenerationConfig(max_new_tokens=12, batch_size=batch_size)
    fast, plain = _both(model, tiny_tok, PROMPTS, cfg, monkeypatch)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [(g.text, g.finished) for g in fast] == [(g.text, g.finished) for g in plain]
    assert len({tuple(g.token_ids) for g in plain}) > len(PROMPTS) // 2  # answers differ between prompts


def test_finished_rows_leave_the_batch_with_the_same_outputs(tiny_tok, monkeypatch):
    """Make the stop token likely, so rows finish at different steps and the batch shrinks mid-generation."""
    from collections import Counter

    model = _lively(build_tiny_model(tiny_tok, seed=3))
    cfg = GenerationConfig(max_new_tokens=16, batch_size=8)
    free = generate(model, tiny_tok, PROMPTS, cfg, progress=False)
    # declare as a second stop token one that some answers produce early and others never do
    counts = Counter(t for g in free for t in set(g.token_ids[1:8]))
    extra = next(t for t, c in counts.most_common() if 1 < c < len(PROMPTS) - 1)
    model.generation_config.eos_token_id = [tiny_tok.eos_token_id, extra]
    fast, plain = _both(model, tiny_tok, PROMPTS, cfg, monkeypatch)
    assert any(g.finished for g in plain) and not all(g.finished for g in plain)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finished for g in fast] == [g.finished for g in plain]


def test_patched_model_and_sampling_fallback(tiny_tok, monkeypatch):
    from safetypatch.config import PatchShape
    from safetypatch.patches import attach_new_patch

    model = attach_new_patch(_lively(build_tiny_model(tiny_tok, seed=4)), PatchShape(rank=2, layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4)
    fast, plain = _both(model, tiny_tok, PROMPTS, cfg, monkeypatch)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    with variant(model, "base"):
        fast_b, plain_b = _both(model, tiny_tok, PROMPTS, cfg, monkeypatch)
    assert [g.token_ids for g in fast_b] == [g.token_ids for g in plain_b]
    assert not fast_greedy_ok(model, GenerationConfig(do_sample=True))
    model.generation_config.repetition_penalty = 1.3  # a logits processor the hand loop lacks: fall back
    assert not fast_greedy_ok(model, cfg)


def test_shared_prefix_leaves_a_token_per_prompt():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == [1, 2, 3]
    assert shared_prefix([[1, 2], [1, 2, 3]]) == [1]
    assert shared_prefix([[1, 2, 3]]) == []
    assert shared_prefix([[7, 2], [1, 2]]) == []


def test_generate_keeps_a_callers_autocast(tiny_tok):
    """The trainer's dev checks call generate under bf16 autocast with frozen weights held in bf16; generate must
    not switch that autocast off (it did once: a float/bfloat16 matmul error)."""
    import torch

    from support import build_tiny_model

    model = build_tiny_model(tiny_tok)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data = mod.weight.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, tiny_tok, ["hello there", "a longer prompt here"], GenerationConfig(max_new_tokens=3),
                       progress=False)
    assert len(out) == 2
    bf16 = generate(build_tiny_model(tiny_tok), tiny_tok, ["hello"], GenerationConfig(max_new_tokens=3, bf16=True),
                    progress=False)
    assert len(bf16) == 1


def test_rows_stop_once_decided_with_the_openings_of_full_answers(tiny_tok):
    """A row leaves the batch once `decided(partial text)` holds: its text is the opening of the full answer."""
    model = _lively(build_tiny_model(tiny_tok, seed=3, layers=2))
    cfg = GenerationConfig(max_new_tokens=16, batch_size=4)
    full = generate(model, tiny_tok, PROMPTS, cfg, progress=False)
    seen: list[str] = []

    def decided(text):
        seen.append(text)
        return len(text) >= 6

    short = generate(model, tiny_tok, PROMPTS, cfg, progress=False, decided=decided)
    assert seen and any(len(s.token_ids) < len(f.token_ids) for s, f in zip(short, full))
    for s, f in zip(short, full):
        assert f.token_ids[: len(s.token_ids)] == s.token_ids
        if len(s.token_ids) < len(f.token_ids):  # stopped early: at the first token that decided it
            assert len(tiny_tok.decode(s.token_ids, skip_special_tokens=True)) >= 6
            assert len(tiny_tok.decode(s.token_ids[:-1], skip_special_tokens=True)) < 6


def test_keyword_refusal_decided_agrees_with_the_judge_on_every_continuation():
    from safetypatch.judges import keyword_refusal, keyword_refusal_decided

    for full in ["I'm sorry, but I can't help with that.", "No, I won't.", "Nope, here it is", "I can do that!",
                 "  Sure! Step 1", "It is not appropriate to", "It is a fine question", "\u2019tis", "As an AI"]:
        verdict = keyword_refusal(full)
        first = next((k for k in range(len(full) + 1) if keyword_refusal_decided(full[:k])), None)
        assert first is not None, full
        for k in range(first, len(full) + 1):  # once decided, every longer opening gets the full answer's verdict
            assert keyword_refusal(full[:k]) == verdict, (full, k)
    assert not keyword_refusal_decided("") and not keyword_refusal_decided("I'm")
    assert not keyword_refusal_decided("no") and keyword_refusal_decided("no,") and keyword_refusal_decided("not")
    assert keyword_refusal_decided("Sure")


def test_growing_cache_layer_holds_what_dynamic_layer_holds():
    """The hand loop's cache layer: same states as transformers' DynamicLayer through prefill, decoding steps,
    rows leaving and a base-class method replacing its tensors; decoding steps write into the same storage."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    ref, grown = DynamicLayer(), growing_layer_class()(room=3)

    def step(t, b):
        k, v = torch.randn(b, 2, t, 4), torch.randn(b, 2, t, 4)
        for a, bb in zip(ref.update(k, v), grown.update(k, v)):
            assert torch.equal(a, bb)

    step(5, 4)  # prefill
    store = grown.k_store.data_ptr()
    step(1, 4)
    step(1, 4)
    assert grown.k_store.data_ptr() == store  # appended in place, no new tensor
    keep = torch.tensor([0, 2, 3])
    ref.batch_select_indices(keep)
    grown.batch_select_indices(keep)
    step(1, 3)
    step(1, 3)  # past the room: the storage grows
    ref.batch_repeat_interleave(2)
    grown.batch_repeat_interleave(2)  # the base class replaces keys / values: adopted again at the next update
    step(1, 6)
    assert grown.get_seq_length() == ref.get_seq_length() == 10
