import json

from conftest import build_tiny_model
from safetypatch.config import PatchShape
from safetypatch.data.readers import Record
from safetypatch.patch import attach_new_patch, save_patch, verify_files
from safetypatch.patch_ops import delta_weights
from safetypatch.redteam import RedteamConfig, format_table, pick_failures, run_redteam, split_pool


def test_split_and_pick_round_robin():
    pool = [Record(prompt=f"p{i}") for i in range(9)]
    work, held = split_pool(pool, 3)
    assert [r.prompt for r in held] == ["p2", "p5", "p8"] and len(work) == 6
    rows = [{"attack": a, "refused": False, "i": i} for a in ("x", "y") for i in range(3)]
    rows.append({"attack": "x", "refused": True, "i": 9})
    got = pick_failures(rows, 3)
    assert [r["attack"] for r in got] == ["x", "y", "x"] and all(not r["refused"] for r in got)


def test_two_rounds_on_tiny_model(tiny_tok, tmp_path):
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
    table = run_redteam(tmp_path / "p0", pool, tmp_path / "rt", cfg=cfg,
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
    assert "worst case" in format_table(table)
    # a rerun resumes: every round is already done
    again = run_redteam(tmp_path / "p0", pool, tmp_path / "rt", cfg=cfg,
                        model_factory=lambda: (build_tiny_model(tiny_tok), tiny_tok), progress=False)
    assert again == table
