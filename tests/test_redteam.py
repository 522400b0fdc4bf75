import json
import shutil

import pytest

from support import build_tiny_model
from safetypatch.errors import ConfigError
from safetypatch.config import PatchShape
from safetypatch.data.readers import Record
from safetypatch.modeling import fingerprint
from safetypatch.patches import attach_new_patch, delta_weights, load_patch, save_patch, verify_files
from safetypatch.jobs.redteam import RedteamConfig, format_table, pick_failures, run_redteam, split_pool


def test_split_and_pick_round_robin():
    pool = [Record(prompt=f"p{i}") for i in range(9)]
    work, held = split_pool(pool, 3)
    assert [r.prompt for r in held] == ["p2", "p5", "p8"] and len(work) == 6
    rows = [{"attack": a, "refused": False, "i": i} for a in ("x", "y") for i in range(3)]
    rows.append({"attack": "x", "refused": True, "i": 9})
    got = pick_failures(rows, 3)
    assert [r["attack"] for r in got] == ["x", "y", "x"] and all(not r["refused"] for r in got)


def test_two_rounds_on_tiny_model(tiny_tok, tmp_path, monkeypatch):
    def jsonl(name, n, **extra):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"{name} request {i}", **extra}) + "\n" for i in range(n)))
        return str(p)

    first = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=1, target_modules=["up_proj"], layers="all"))
    save_patch(first, tmp_path / "p0", {"base_model": {"spec": "tiny"}})
    pool = [Record(prompt=f"harmful thing {i}", response="I'm sorry, I can't help with that.") for i in range(6)]
    cfg = RedteamConfig(rounds=2, attacks=("none", "prefix_injection"), per_round=3, max_new_tokens=3,
                        benign_dev=jsonl("benign_dev", 3))
    cfg.train = {"rank": 1, "alpha": 4.0, "epochs": 1.0, "batch_size": 2, "anchor_tokens": 4, "max_length": 96,
                 "eval_every": 0, "dev_size": 3, "dev_tokens": 3, "benign": jsonl("anchors", 4),
                 "dev_harmful": jsonl("dev_h", 3), "dev_benign": jsonl("dev_b", 3), "bf16": "no", "save_dtype": "float32"}
    monkeypatch.chdir(tmp_path)  # paths relative to the working directory, as a user types them
    table = run_redteam("p0", pool, "rt", cfg=cfg,
                        model_factory=lambda: (build_tiny_model(tiny_tok), tiny_tok), progress=False)
    assert [row["round"] for row in table] == [0, 1, 2]
    assert table[1]["failures_found"] > 0 and (tmp_path / "rt/round-1/failures.jsonl").exists()
    stack = tmp_path / "rt/round-2/stack"
    meta = verify_files(stack)
    assert meta["shape"]["rank"] == 3 and len(meta["stack"]) == 3  # 1 + 1 + 1: every round's patch, exactly
    parts = [tmp_path / "p0", tmp_path / "rt/round-1/train/patch", tmp_path / "rt/round-2/train/patch"]
    want = {}
    for p in parts:
        for k, v in delta_weights(p).items():
            want[k] = want.get(k, 0) + v
    got = delta_weights(stack)
    assert set(got) == set(want) and all((got[k] - want[k]).abs().max() < 1e-5 for k in got)
    assert "worst case" in format_table(table) and "benign KL" in format_table(table)
    # every round's patch names the true base model (not the merged one it was trained on) and loads onto it
    base = build_tiny_model(tiny_tok)
    for i, p in enumerate(parts[1:], start=1):
        meta = verify_files(p)
        assert meta["base_model"]["fingerprint"] == fingerprint(base)
        assert meta["base_model"]["trained_on_stack"] == str(tmp_path / "p0" if i == 1 else tmp_path / "rt/round-1/stack")
        load_patch(build_tiny_model(tiny_tok), p)
    # the failures become refusal examples: the wrapped prompt and the pool's own response
    rows = [json.loads(x) for x in (tmp_path / "rt/round-1/dev.jsonl").read_text().splitlines()]
    failures = [json.loads(x) for x in (tmp_path / "rt/round-1/failures.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f["wrapped"] for f in failures] and len(rows) <= 3
    train_rows = [json.loads(x) for x in (tmp_path / "rt/round-1/train.jsonl").read_text().splitlines()]
    assert len(train_rows) >= cfg.min_refusals and {r["prompt"] for r in train_rows} == {r["prompt"] for r in rows}
    assert all(r["response"] == "I'm sorry, I can't help with that." for r in rows)
    # KL drift: the first patch is PEFT's no-op init (B = 0), later rounds move the benign answers' distributions
    assert table[0]["benign_kl"] == pytest.approx(0.0, abs=1e-6) and table[2]["benign_kl"] > 0
    # a rerun resumes: every round is already done
    again = run_redteam(tmp_path / "p0", pool, tmp_path / "rt", cfg=cfg,
                        model_factory=lambda: (build_tiny_model(tiny_tok), tiny_tok), progress=False)
    assert again == table
    # an interrupted run resumes from another working directory: round.json paths are relative to the run
    assert json.loads((tmp_path / "rt/round-1/round.json").read_text())["stack"] == "round-1/stack"
    shutil.rmtree(tmp_path / "rt/round-2")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = run_redteam("../p0", pool, "../rt", cfg=cfg,
                          model_factory=lambda: (build_tiny_model(tiny_tok), tiny_tok), progress=False)
    assert resumed[:2] == table[:2] and resumed[2]["parts"] == table[2]["parts"]
    assert verify_files(tmp_path / "rt/round-2/train/patch")["base_model"]["trained_on_stack"] == str(
        tmp_path / "rt/round-1/stack")
    # a different run in the same directory is refused, not mixed in
    other = RedteamConfig(**{**cfg.__dict__, "per_round": 2})
    with pytest.raises(ConfigError, match="per_round"):
        run_redteam(tmp_path / "p0", pool, tmp_path / "rt", cfg=other,
                    model_factory=lambda: (build_tiny_model(tiny_tok), tiny_tok), progress=False)


def test_refusal_examples_use_the_pool_refusal_else_a_generic_one():
    from safetypatch.judges import keyword_refusal
    from safetypatch.jobs.redteam import refusal_examples

    failures = [{"prompt": "p", "wrapped": "WRAP p", "reference": "No, I won't do that."},
                {"prompt": "q", "wrapped": "WRAP q", "reference": None},
                {"prompt": "r", "wrapped": "WRAP r", "reference": None}]
    rows = refusal_examples(failures)
    assert [r["prompt"] for r in rows] == ["WRAP p", "WRAP q", "WRAP r"]
    assert rows[0]["response"] == "No, I won't do that." and rows[1]["response"] != rows[2]["response"]
    assert all(keyword_refusal(r["response"]) for r in rows[1:])
    repeated = refusal_examples(failures, min_rows=7)
    assert len(repeated) == 9 and repeated[3:6] == rows and repeated[6:] == rows  # whole copies, in order


def test_format_table_text_is_unchanged():
    """The per-round table, character for character as before `tables.render_table` drew it (a stopped round
    spans the columns)."""
    table = [{"round": 0, "failures_found": None, "harmful_plain": 0.5, "harmful_worst_case": 0.25,
              "benign_refusal": 0.125, "benign_kl": 0.0, "stack_rank": 1},
             {"round": 1, "failures_found": 12, "harmful_plain": 0.875, "harmful_worst_case": 0.5,
              "benign_refusal": 0.0625, "benign_kl": 0.00123456, "stack_rank": 2},
             {"round": 2, "failures_found": 3, "harmful_plain": 1.0, "harmful_worst_case": 0.75, "benign_refusal": 0.0,
              "stack_rank": 3},
             {"round": 3, "failures_found": 0, "note": "no failures left on the red-team half", "parts": []}]
    assert format_table(table) == (
        "round  failures  harmful plain  worst case  benign refusal  benign KL  rank\n"
        "---------------------------------------------------------------------------\n"
        "    0         -            50%         25%           12.5%          0  1\n"
        "    1        12            88%         50%            6.2%    0.00123  2\n"
        "    2         3           100%         75%            0.0%          -  3\n"
        "    3         0  (stopped: no failures left on the red-team half)")
