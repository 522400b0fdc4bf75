"""Issue 16: a prompt longer than the model's context is cut (the chat template's opening and the end of the prompt
kept, one warning line per call), never sent to the model whole; prompts that fit are unchanged."""

import functools
import json
import logging

import pytest
from transformers.models.llama import modeling_llama

from support import write_jsonl
from safetypatch.cli import main
from safetypatch.config import GenerationConfig
from safetypatch.data.chat import prompt_ids
from safetypatch.errors import ConfigError
from safetypatch.modeling import generation
from safetypatch.modeling.generation import context_length, fit_context, generate

CONTEXT = 512  # the tiny model's max_position_embeddings (tests/support.py)
LONG = "Write a poem about the sea and the moon. " * 4000  # ~30k tokens for the tiny tokenizer


@pytest.fixture()
def guarded(monkeypatch):
    """Every forward of a Llama model checks that the sequence it attends over fits the context; returns the
    longest seen."""
    seen = [0]
    forward = modeling_llama.LlamaModel.forward

    @functools.wraps(forward)
    def checked(self, *args, **kw):
        ids, mask = kw.get("input_ids"), kw.get("attention_mask")
        n = (mask if mask is not None else ids).shape[-1]
        seen[0] = max(seen[0], n)
        assert n <= CONTEXT, f"a sequence of {n} tokens reached a model with a {CONTEXT}-token context"
        return forward(self, *args, **kw)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", checked)
    return seen


@pytest.mark.parametrize("fast", [True, False])
def test_long_prompt_is_cut_with_one_warning(tiny_model, tiny_tok, guarded, caplog, monkeypatch, fast):
    monkeypatch.setattr(generation, "_FAST_GREEDY", fast)
    cfg = GenerationConfig(max_new_tokens=4, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="safetypatch.modeling.generation"):
        out = generate(tiny_model, tiny_tok, ["hello", LONG, [{"role": "user", "content": LONG}], "poem"], cfg,
                       progress=False)
    assert len(out) == 4 and guarded[0] <= CONTEXT
    warnings = [r.getMessage() for r in caplog.records if "longer than the model's context" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: 2 prompt(s) longer than the model's context were cut to 508 tokens "
                                  "(context 512 less max_new_tokens 4; the longest had ")


def test_cut_keeps_the_template_opening_and_the_end(tiny_tok):
    class Model:  # fit_context reads only the config
        config = type("C", (), {"max_position_embeddings": 64})()

    ids = prompt_ids(tiny_tok, [{"role": "user", "content": LONG}])
    (cut,) = fit_context(Model(), tiny_tok, [ids], max_new_tokens=16)
    assert len(cut) == 48
    opening = tiny_tok("<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\n",
                       add_special_tokens=False)["input_ids"]  # the system prompt and the user-turn header
    assert len(opening) == 20 and cut[:20] == opening and ids[:20] == opening
    assert cut[-10:] == ids[-10:]  # the end of the text, <|im_end|>, the assistant-turn header


def test_prompts_that_fit_are_untouched(tiny_model, tiny_tok):
    encoded = [prompt_ids(tiny_tok, [{"role": "user", "content": p}]) for p in ("hello", "a poem " * 50)]
    assert fit_context(tiny_model, tiny_tok, encoded, 64) is encoded
    assert context_length(tiny_model) == CONTEXT


def test_outputs_on_normal_prompts_are_unchanged(tiny_model, tiny_tok):
    """The same call with the context check switched off (a context the prompts never reach) gives identical
    answers: the check changes nothing for prompts that fit."""
    prompts = ["hello", "Write a poem about the sea", "How do I kill a Python process?"]
    cfg = GenerationConfig(max_new_tokens=8)
    with_check = generate(tiny_model, tiny_tok, prompts, cfg, progress=False)
    tiny_model.config.max_position_embeddings = 10**9
    try:
        without = generate(tiny_model, tiny_tok, prompts, cfg, progress=False)
    finally:
        tiny_model.config.max_position_embeddings = CONTEXT
    assert [g.token_ids for g in with_check] == [g.token_ids for g in without]


def test_max_new_tokens_that_leave_no_room_is_a_config_error(tiny_model, tiny_tok):
    with pytest.raises(ConfigError, match="max_new_tokens 512 leaves no room for a prompt in the model's context of "
                                          "512 tokens; lower --max-new-tokens below 512"):
        generate(tiny_model, tiny_tok, ["hello"], GenerationConfig(max_new_tokens=512), progress=False)


def test_cli_eval_long_prompt(tiny_model_dir, tmp_path, guarded, caplog):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": LONG, "id": "long"}, {"prompt": "hello", "id": "short"}])
    out = tmp_path / "ev"
    with caplog.at_level(logging.WARNING, logger="safetypatch.modeling.generation"):
        rc = main(["eval", "--model", str(tiny_model_dir), "--prompts", str(f), "--out", str(out),
                   "--max-new-tokens", "3"])
    assert rc == 0 and guarded[0] <= CONTEXT
    assert any("1 prompt(s) longer than the model's context were cut to 509 tokens" in r.getMessage()
               for r in caplog.records)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["long", "short"] and rows[0]["prompt"] == LONG.strip()
