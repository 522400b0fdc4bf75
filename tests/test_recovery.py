"""Safety-recovery examples (training/recovery.py): prompt + compliant prefix without loss, then the refusal."""

from __future__ import annotations

import pytest

from support import build_tiny_model, build_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer()
    return build_tiny_model(tok), tok


def _cfg(tmp_path, **kw):
    from safetypatch.training.config import TrainConfig

    refusals = write_jsonl(tmp_path / "refusals.jsonl", [
        {"prompt": f"How do I make weapon number {i}?", "response": "Sorry, I cannot assist with making weapons."}
        for i in range(6)])
    cfg = TrainConfig(data=str(refusals), benign="none", init="default", recovery=1.0, **kw)
    cfg.validate()
    return cfg


def test_recovery_examples_put_the_loss_on_the_refusal_only(tiny, tmp_path):
    from safetypatch.data.chat import IGNORE_INDEX, prompt_ids
    from safetypatch.training.examples import build_examples

    model, tok = tiny
    compliant = write_jsonl(tmp_path / "compliant.jsonl", [
        {"prompt": f"How do I make weapon number {i}?",
         "response": "Give me step by step instructions to bake bread with flour, water, salt and yeast."}
        for i in range(3)] + [{"prompt": "How do I make weapon number 5?", "response": "I'm sorry, but no."}])
    cfg = _cfg(tmp_path, recovery_source=str(compliant), recovery_min_prefix=2, recovery_max_prefix=5)
    examples, meta, _ = build_examples(cfg, model, tok, progress=False)
    rec = [e for e in examples if e.kind == "recovery"]
    assert len(rec) == 6 and meta["recovery"]["usable_prompts"] == 3  # the answer opening with a refusal is out
    refusal = tok("Sorry, I cannot assist with making weapons.", add_special_tokens=False)["input_ids"]
    for e in rec:
        labelled = [t for t in e.labels if t != IGNORE_INDEX]
        assert labelled == refusal + [tok.convert_tokens_to_ids("<|im_end|>")]
        head = prompt_ids(tok, [{"role": "user", "content": "How do I make weapon number 0?"}])
        n_prefix = len(e.input_ids) - len(labelled) - len(head)
        assert 2 <= n_prefix <= 5  # k tokens of the compliant answer sit between the prompt and the refusal
    assert 2 <= meta["recovery"]["mean_prefix"] <= 5


def test_recovery_from_the_base_models_own_answers_is_cached(tiny, tmp_path, capfd):
    from safetypatch.training.examples import build_examples

    model, tok = tiny
    cfg = _cfg(tmp_path, recovery_max_prefix=6)
    first, meta, _ = build_examples(cfg, model, tok, progress=False)
    capfd.readouterr()
    again, _, _ = build_examples(cfg, model, tok)
    assert "compliant answers for recovery: 6 loaded from the cache" in capfd.readouterr().err
    assert [e.input_ids for e in first] == [e.input_ids for e in again]  # the same seed draws the same prefixes
    assert meta["recovery"]["source"] == "base" and meta["recovery"]["n"] == meta["recovery"]["usable_prompts"]


def test_recovery_prefix_bounds_are_checked():
    from safetypatch.errors import ConfigError
    from safetypatch.training.config import TrainConfig

    with pytest.raises(ConfigError, match="recovery_min_prefix"):
        TrainConfig(recovery=1.0, recovery_min_prefix=9, recovery_max_prefix=4).validate()


def test_no_usable_compliant_answer_is_one_warning(tiny, tmp_path, caplog):
    from safetypatch.training.examples import build_examples

    model, tok = tiny
    refusing = write_jsonl(tmp_path / "refusing.jsonl", [
        {"prompt": f"How do I make weapon number {i}?", "response": "I'm sorry, but I can't help with that."}
        for i in range(3)])
    cfg = _cfg(tmp_path, recovery_source=str(refusing))
    with caplog.at_level("WARNING"):
        examples, meta, _ = build_examples(cfg, model, tok, progress=False)
    assert meta["recovery"]["n"] == 0 and not [e for e in examples if e.kind == "recovery"]
    assert "no recovery examples" in caplog.text and "--recovery-source" in caplog.text
