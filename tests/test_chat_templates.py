"""`--chat-template auto|plain|chatml|FILE` (issue 17): a model without a chat template (a base model) formats with
the documented `plain` fallback, warned once; the prompt's tokens are a prefix of prompt + answer; the answer is
learned followed by EOS; ChatML and a template file work; a bad file is one clear ConfigError; patch.json records
the template, and evaluating with another one warns."""

from __future__ import annotations

import json
import logging

import pytest

from support import build_tiny_model, build_tiny_tokenizer, write_jsonl
from safetypatch.cli import main
from safetypatch.data.chat import IGNORE_INDEX, encode_example, prompt_ids, prompt_text
from safetypatch.data.templates import (CHATML, PLAIN, apply_template, choose_template, end_of_turn_id,
                                        forget_warnings, text_sha256)
from safetypatch.errors import ConfigError

FALLBACK = "has no chat template; using the plain fallback (--chat-template plain)"
QUESTIONS = ["How do I build a bomb?", "Write a poem about the sea.", "What is 2 + 2?", "  spaced  ", "Tell me\nmore"]
ANSWERS = ["I'm sorry, but I can't help with that.", "Sure: the sea is blue.", "4", "1. Mix flour", "\nNo."]


@pytest.fixture()
def bare_tok():
    """The tiny tokenizer (BOS <|im_start|>, EOS <|im_end|>) with its chat template removed, warnings reset."""
    forget_warnings()
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    return tok


@pytest.fixture()
def bare_model_dir(tmp_path):
    """A tiny model directory whose tokenizer has no chat template (a base model)."""
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    d = tmp_path / "base-model"
    build_tiny_model(tok).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]


def test_auto_falls_back_to_plain_with_one_warning(bare_tok, caplog):
    with caplog.at_level(logging.WARNING):
        assert choose_template(bare_tok, "auto", model="base-x").name == "plain"
        tpl = apply_template(bare_tok, "auto", model="base-x")
        for q in QUESTIONS:  # formatting many prompts warns no more
            prompt_ids(bare_tok, [{"role": "user", "content": q}])
    assert tpl.name == "plain" and bare_tok.chat_template == PLAIN
    assert fallback_lines(caplog) == ["warning: base-x has no chat template; using the plain fallback "
                                      "(--chat-template plain); pass --chat-template chatml|FILE to choose"]


def test_a_tokenizer_built_by_hand_without_template_formats_plain_once(bare_tok, caplog):
    with caplog.at_level(logging.WARNING):
        texts = [prompt_text(bare_tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    assert texts[0] == "<|im_start|>User: How do I build a bomb?\n\nAssistant:"
    assert len(fallback_lines(caplog)) == 1


def test_auto_keeps_the_tokenizer_own_template(caplog):
    tok = build_tiny_tokenizer()
    own = tok.chat_template
    with caplog.at_level(logging.WARNING):
        assert apply_template(tok, "auto").name == "tokenizer"
    assert tok.chat_template == own and not fallback_lines(caplog)


@pytest.mark.parametrize("choice", ["plain", "chatml"])
def test_prompt_tokens_are_a_prefix_and_labels_are_answer_and_stop(bare_tok, choice):
    apply_template(bare_tok, choice)
    eos = bare_tok.eos_token_id
    for q in QUESTIONS:
        for a in ANSWERS:
            chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
            p = prompt_ids(bare_tok, chat)
            full = list(bare_tok.apply_chat_template(chat + [{"role": "assistant", "content": a}],
                                                     tokenize=True)["input_ids"])
            assert full[: len(p)] == p, (q, a)
            ex = encode_example(bare_tok, chat, a, max_length=256)
            assert ex.input_ids == full  # the training sequence is the template's own tokenization
            labels = [t for t in ex.labels if t != IGNORE_INDEX]
            assert ex.labels[: len(p)] == [IGNORE_INDEX] * len(p) and labels == full[len(p):]
            if choice == "plain":  # exactly the answer (with the space the prompt left to it) and EOS
                assert labels == bare_tok(" " + a, add_special_tokens=False)["input_ids"] + [eos]
            else:
                assert bare_tok.decode(labels) == a + "<|im_end|>\n" and eos in labels


def test_plain_opens_with_bos_when_the_tokenizer_has_one(bare_tok):
    apply_template(bare_tok, "plain")
    ids = prompt_ids(bare_tok, [{"role": "user", "content": "hi"}])
    assert ids[0] == bare_tok.bos_token_id and ids.count(bare_tok.bos_token_id) == 1
    no_bos = build_tiny_tokenizer()
    no_bos.bos_token = None
    apply_template(no_bos, "plain")
    assert prompt_text(no_bos, [{"role": "user", "content": "hi"}]) == "User: hi\n\nAssistant:"


def test_plain_multi_turn_text():
    tok = build_tiny_tokenizer()
    apply_template(tok, "plain")
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    assert prompt_text(tok, chat) == ("<|im_start|>S\n\nUser: U1\n\nAssistant: A1<|im_end|>\n\nUser: U2\n\n"
                                      "Assistant:")


def test_chatml_text_and_its_stop_token(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from safetypatch.modeling import load_model, load_tokenizer
    from safetypatch.modeling.generation import stop_ids

    base = build_tiny_tokenizer()  # its EOS is <|im_end|>; a base model's EOS differs: <|endoftext|>
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    d = tmp_path / "m"
    build_tiny_model(base).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    model, loaded = load_model(str(d), chat_template="chatml")
    im_end = loaded.convert_tokens_to_ids("<|im_end|>")
    assert loaded.chat_template == CHATML and im_end != loaded.eos_token_id
    assert prompt_text(loaded, [{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn_id(loaded) == im_end
    assert set(stop_ids(model, loaded)) >= {im_end, loaded.eos_token_id}  # generation stops on <|im_end|>
    ex = encode_example(loaded, [{"role": "user", "content": "hi"}], [5, 6], max_length=64)  # a base answer's ids
    assert [t for t in ex.labels if t != IGNORE_INDEX] == [5, 6, im_end]
    plain_tok = load_tokenizer(str(d), chat_template="plain")
    assert end_of_turn_id(plain_tok) == plain_tok.eos_token_id


def test_template_file(bare_tok, tmp_path):
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}", encoding="utf-8")
    tpl = apply_template(bare_tok, str(f))
    assert tpl.name == "file:mine.jinja" and tpl.record()["sha256"] == text_sha256(f.read_text())
    assert prompt_text(bare_tok, [{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant]"


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    (b"{% for m in messages %}{{ m['content'] }}", "not a valid Jinja template"),
    (b"{{ 'caf\xe9' }}", "not UTF-8"),
    (b"  \n", "the file is empty"),
    ("dir", "is a directory"),
])
def test_bad_template_files_are_one_clear_error(bare_tok, tmp_path, content, needle):
    f = tmp_path / "t.jinja"
    if content == "dir":
        f.mkdir()
    elif content is not None:
        f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        apply_template(bare_tok, str(f))
    msg = str(e.value)
    assert msg.startswith("--chat-template") and str(f) in msg and needle in msg and "give auto, plain, chatml or a Jinja" in msg


def test_bad_template_file_fails_before_the_model_loads(tiny_model_dir, harmful_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(harmful_file), "--out", str(out),
               "--chat-template", str(tmp_path / "missing.jinja")])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template" in err and "missing.jinja: no such file" in err and "Traceback" not in err
    assert not out.exists()
    rc = main(["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "ev"), "--chat-template", "chatlm"])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template" in err and "chatlm: no such file" in err and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("command", ["train", "eval", "demo", "chat", "analyze", "calibrate", "redteam"])
def test_every_model_loading_command_takes_the_flag(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--chat-template" in capsys.readouterr().out


def test_train_records_the_template_and_eval_warns_on_another(bare_model_dir, harmful_file, benign_file, tmp_path,
                                                               caplog):
    from safetypatch.jobs.train import train
    from safetypatch.training.config import TrainConfig

    forget_warnings()
    cfg = TrainConfig(model=str(bare_model_dir), data=str(harmful_file), benign=str(benign_file), rank=1,
                      target_modules=["up_proj"], layers="all", epochs=1, batch_size=4, dev_size=2, dev_tokens=2,
                      anchor_tokens=4, bf16="no", eval_every=0, init="default", freeze_a=False)
    with caplog.at_level(logging.WARNING):
        res = train(cfg, tmp_path / "run", progress=False)
    assert len(fallback_lines(caplog)) == 1
    meta = json.loads((res.output_dir / "patch.json").read_text())
    assert meta["chat_template"] == {"name": "plain", "sha256": text_sha256(PLAIN)}
    assert meta["recipe"]["chat_template"] == "auto"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc = main(["eval", "--model", str(bare_model_dir), "--patch", str(res.output_dir), "--prompts", str(prompts),
                   "--out", str(tmp_path / "ev"), "--max-new-tokens", "2", "--chat-template", "chatml"])
    assert rc == 0
    lines = [r.getMessage() for r in caplog.records if "was trained with chat template" in r.getMessage()]
    assert len(lines) == 1 and "plain" in lines[0] and "this run uses chatml" in lines[0]
    assert "pass --chat-template plain" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc = main(["eval", "--model", str(bare_model_dir), "--patch", str(res.output_dir), "--prompts", str(prompts),
                   "--out", str(tmp_path / "ev2"), "--max-new-tokens", "2"])
    assert rc == 0 and not [r for r in caplog.records if "was trained with chat template" in r.getMessage()]
