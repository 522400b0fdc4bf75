"""Utility metrics on the tiny random model: MC scoring against a direct computation, GSM8K extraction, KL, PPL."""

import json
import math

import pytest

from support import write_jsonl
from safetypatch.config import GenerationConfig, PatchShape
from safetypatch.errors import DataError
from safetypatch.evals import utility
from safetypatch.modeling.backends import TransformersBackend
from safetypatch.patches import attach_new_patch


def _direct_loglik(model, tok, ctx: str, cont: str) -> float:
    """Sum of log p(continuation tokens | context), one unbatched, unpadded forward pass over the whole text."""
    import torch

    ctx_ids = tok(ctx)["input_ids"]
    whole = tok(ctx + cont)["input_ids"]
    assert whole[: len(ctx_ids)] == ctx_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[t - 1, whole[t]] for t in range(len(ctx_ids), len(whole))))


@pytest.fixture()
def mc_file(tmp_path):
    rows = [
        {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
        {"question": "Which one is a number?", "choices": ["sea", "moon", "0123", "bread"], "answer": "C"},
        {"question": "Pick the poem.", "choices": {"text": ["a poem about the sea", "kill"], "label": ["1", "2"]},
         "answerKey": "1"},
    ]
    return write_jsonl(tmp_path / "mc.jsonl", rows)


@pytest.mark.parametrize("style", ["letter", "text"])
def test_mc_accuracy_matches_direct_computation(tiny_model, tiny_tok, mc_file, style):
    items = utility.load_mc_jsonl(mc_file)
    assert [it.answer for it in items] == [0, 2, 0]
    backend = TransformersBackend(tiny_model, tiny_tok)
    res = utility.mc_accuracy(backend, items, style=style, batch_size=2, progress=False)
    correct = 0
    for it, row in zip(items, res.rows):
        ctx, conts = utility.mc_context(it, style)
        direct = [_direct_loglik(tiny_model, tiny_tok, ctx, c) for c in conts]
        assert row["loglik"] == pytest.approx(direct, abs=1e-3)
        pred = max(range(len(direct)), key=lambda j: direct[j])
        assert row["pred"] == pred
        correct += pred == it.answer
    assert res.accuracy == pytest.approx(correct / 3) and res.n == 3
    assert (res.accuracy_norm is None) == (style == "letter")


def test_mmlu_loader_round_robin_and_errors(tmp_path):
    d = tmp_path / "mmlu"
    d.mkdir()
    (d / "anatomy_test.csv").write_text("q1,a,b,c,d,A\nq2,a,b,c,d,B\nq3,a,b,c,d,C\n")
    (d / "virology_test.csv").write_text('"q, with comma",a,b,c,d,D\n')
    items = utility.load_mmlu(d)
    assert [it.question for it in items] == ["q1", "q, with comma", "q2", "q3"]
    assert items[1].subject == "virology" and items[1].answer == 3
    assert len(utility.load_mmlu(d, limit=2)) == 2
    (d / "bad_test.csv").write_text("q,a,b,c,d,AB\n")
    with pytest.raises(DataError, match=r"bad_test.csv:1: field 'answer'"):
        utility.load_mmlu(d)
    (d / "bad_test.csv").write_text("q,a,b,c\n")
    with pytest.raises(DataError, match="expected 6 columns"):
        utility.load_mmlu(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x_test.csv").write_text("")
    with pytest.raises(DataError, match="no questions"):
        utility.load_mmlu(empty)


def test_mc_jsonl_errors(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'answer'"):
        utility.load_mc_jsonl(f)
    f = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "options": ["a", "b"], "answer": 0}])
    with pytest.raises(DataError, match=r"n.jsonl:1: field 'choices'"):
        utility.load_mc_jsonl(f)


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48 clips in April and 24 in May, so 48 + 24 = 72.\n#### 72", "72"),
    ("#### $1,080.00", "1080"),
    ("She pays 3 * $5 = $15 per week. The answer is 15.", "15"),
    ("So the answer is: -4", "-4"),
    ("First 10, then 20, finally 2.5 hours", "2.5"),
    ("#### 7 apples (not 8)", "7"),
    ("The answer is 1,000,000 dollars.", "1000000"),
    ("I cannot solve this.", None),
    ("", None),
])
def test_gsm8k_answer_extraction_golden(text, want):
    assert utility.extract_answer(text) == want


def test_gsm8k_gold_and_scoring(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
                                          {"question": "Big?", "answer": "#### 1,200"}])
    items = utility.load_gsm8k(f)
    assert [it.gold for it in items] == ["5", "1200"]
    res = utility.score_gsm8k(items, ["It is 5.", "#### 1200.0"])
    assert res.exact_match == 1.0 and [r["pred"] for r in res.rows] == ["5", "1200"]
    assert utility.score_gsm8k(items, ["6", "no idea"]).exact_match == 0.0
    bad = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "no marker here"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'answer': no '####' marker"):
        utility.load_gsm8k(bad)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no questions"):
        utility.load_gsm8k(tmp_path / "e.jsonl")


def test_gsm8k_exact_match_runs_on_tiny_model(tiny_model, tiny_tok, tmp_path):
    items = utility.load_gsm8k(write_jsonl(tmp_path / "g.jsonl", [{"question": "2+3?", "answer": "#### 5"}]))
    backend = TransformersBackend(tiny_model, tiny_tok)
    res = utility.gsm8k_exact_match(backend, items, GenerationConfig(max_new_tokens=3), progress=False)
    assert res.n == 1 and res.exact_match in (0.0, 1.0)


def _prompts():
    return ["Write a poem about the sea and the moon.", "What is the capital of France?",
            "Give me step by step instructions to bake bread."]


def test_kl_is_zero_for_a_zero_patch_and_positive_otherwise(tiny_model, tiny_tok):
    import torch

    model = attach_new_patch(tiny_model, PatchShape(rank=2, alpha=8.0, target_modules=["up_proj", "down_proj"],
                                                    layers="all"))
    gen = GenerationConfig(max_new_tokens=6, batch_size=2)
    zero = utility.kl_to_base(model, tiny_tok, _prompts(), gen, batch_size=2, progress=False)
    assert zero.n_prompts + zero.n_empty == 3 and zero.n_tokens > 0
    assert zero.kl_per_token == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    nonzero = utility.kl_to_base(model, tiny_tok, _prompts(), gen, batch_size=2, progress=False)
    assert nonzero.kl_per_token > 1e-6 and math.isfinite(nonzero.kl_per_token)
    assert all(r["kl_per_token"] >= -1e-6 for r in nonzero.rows)
    # the same base answers are scored (the base model is the adapter switched off)
    assert [r["base_answer"] for r in nonzero.rows] == [r["base_answer"] for r in zero.rows]


def test_kl_needs_a_patch(tiny_model, tiny_tok):
    from safetypatch.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a patched model"):
        utility.kl_to_base(tiny_model, tiny_tok, _prompts())


def test_perplexity_finite_and_batch_independent(tiny_model, tiny_tok, tmp_path):
    texts = ["The capital of France is Paris.", "Write a poem about the sea and the moon, please, today.", "Hi"]
    backend = TransformersBackend(tiny_model, tiny_tok)
    a = utility.perplexity(backend, texts, batch_size=3, progress=False)
    b = utility.perplexity(backend, texts, batch_size=1, progress=False)
    assert math.isfinite(a.perplexity) and a.perplexity > 1
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)
    assert a.perplexity == pytest.approx(math.exp(a.nll_per_token))
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'text' is missing"):
        utility.load_texts(f)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no texts"):
        utility.load_texts(tmp_path / "e.txt")
