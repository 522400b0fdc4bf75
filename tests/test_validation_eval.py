"""`safetypatch eval` refuses, before any output exists or any model loads, what it would otherwise ignore or fail on
late (issue 16): suite-only flags with --prompts (today silently ignored: nothing recorded), prompt-only flags with
--suite, and judges that are not registered (a KeyError after the model loaded)."""

from __future__ import annotations

import json

import pytest

from support import write_jsonl
from safetypatch.cli import main
from safetypatch.errors import ConfigError
from safetypatch.evals.refusal import load_prompt_file


@pytest.fixture()
def no_model(monkeypatch):
    import safetypatch.modeling

    monkeypatch.setattr(safetypatch.modeling, "load_model", lambda *a, **k: pytest.fail("model loaded"))


@pytest.fixture()
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a poem"}, {"prompt": "How do I kill a process?"}])


def run(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra,flag", [
    (["--db", "x.db"], "--db"), (["--no-db"], "--no-db"), (["--name", "n"], "--name"),
    (["--data-root", "d"], "--data-root"), (["--shared", "d"], "--data-root"),
    (["--judge-model", "m"], "--judge-model"), (["--device", "cuda"], "--device"),
])
def test_suite_only_flags_with_prompts_are_refused(extra, flag, prompts, tmp_path, capsys, no_model):
    out = tmp_path / "ev"
    rc, err = run(["eval", "--prompts", str(prompts), "--out", str(out), *extra], capsys)
    assert rc == 2 and flag in err and "apply to --suite runs only" in err
    assert not out.exists() and not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("extra,flag", [(["--judges", "refusal_gcg"], "--judges"),
                                        (["--prompt-field", "goal"], "--prompt-field")])
def test_prompt_only_flags_with_a_suite_are_refused(extra, flag, tmp_path, capsys, no_model):
    out = tmp_path / "ev"
    rc, err = run(["eval", "--suite", "quick", "--out", str(out), *extra], capsys)
    assert rc == 2 and flag in err and "prompt-file runs (--prompts) only" in err
    assert not out.exists()


@pytest.mark.parametrize("judges,needle", [("nonsense", "unknown judge 'nonsense'"),
                                           ("refusal_xstest,nonsense", "unknown judge 'nonsense'"),
                                           (",", "--judges names no judge")])
def test_unknown_judges_fail_before_the_model_loads(judges, needle, prompts, tmp_path, capsys, no_model):
    out = tmp_path / "ev"
    rc, err = run(["eval", "--prompts", str(prompts), "--out", str(out), "--judges", judges], capsys)
    assert rc == 2 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_a_prompt_limit_below_one_is_never_a_slice():
    assert len(load_prompt_file("builtin:harmful:test", limit=3)) == 3
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="limit must be an integer >= 1"):
            load_prompt_file("builtin:harmful:test", limit=bad)


def test_good_limit_still_evaluates_that_many(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "ev"
    rc, err = run(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
                   "--limit", "1", "--max-new-tokens", "2"], capsys)
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["n_prompts"] == 1
