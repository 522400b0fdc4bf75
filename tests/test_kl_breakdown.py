"""Where KL(base || patched) sits: `kl_breakdown` on hand-computed lists, the per-token KL of `kl_to_base` against
the backend's summed KL, and a tiny suite run that writes the breakdown (summary.json, log line, utility rows)."""

import json
import textwrap

import pytest

from safetypatch.cli import main
from safetypatch.config import GenerationConfig, PatchShape
from safetypatch.evals.utility.kl import format_breakdown, kl_breakdown, kl_to_base, measure_kl
from safetypatch.modeling import Generation
from safetypatch.modeling.backends import Backend, TransformersBackend
from safetypatch.patches import attach_new_patch


def test_kl_breakdown_hand_computed():
    rows = [[1.0, 0.5, 0.0, 0.0, 0.5], [0.0, 0.0], [], [3.0]]  # prompt 2: nothing scored (empty answer)
    b = kl_breakdown(rows, ["aaa", "b", "c", "d" * 100])
    # position 0: (1 + 0 + 3) / 3; 1: (0.5 + 0) / 2; 2, 3: 0; 4-7: the one 0.5; no 8-15 or later
    assert b["positions"] == pytest.approx({"0": 4 / 3, "1": 0.25, "2": 0.0, "3": 0.0, "4-7": 0.5})
    assert b["position_tokens"] == {"0": 3, "1": 2, "2": 1, "3": 1, "4-7": 1}
    assert b["first4_share"] == pytest.approx(4.5 / 5.0) and b["first4_token_share"] == pytest.approx(7 / 8)
    # 3 scored prompts -> the top 10 % is 1 prompt (prompt 3, KL 3 of 5)
    assert b["top10pct_prompts"] == 1 and b["top10pct_share"] == pytest.approx(0.6)
    assert [t["index"] for t in b["top"]] == [3, 0, 1]
    assert b["top"][0] == {"index": 3, "kl_per_token": 3.0, "kl_sum": 3.0, "n_tokens": 1, "prompt": "d" * 60}
    assert b["top"][1]["kl_per_token"] == pytest.approx(0.4)
    assert b["median_prompt"] == pytest.approx(0.4) and b["mean_prompt"] == pytest.approx(3.4 / 3)
    assert b["per_token"] == pytest.approx(5 / 8)
    assert format_breakdown(b).startswith("pos 0 1.33 | 1 0.25 | 2 0 | 3 0 | 4-7 0.5; first4 90% of KL")


def test_kl_breakdown_long_answers_many_prompts_and_no_kl():
    b = kl_breakdown([[0.1] * 70] + [[0.0] * 3] * 19, top=2)
    assert list(b["positions"]) == ["0", "1", "2", "3", "4-7", "8-15", "16-31", "32-63", "64+"]
    assert b["position_tokens"]["64+"] == 6 and b["positions"]["64+"] == pytest.approx(0.1)
    assert b["top10pct_prompts"] == 2 and b["top10pct_share"] == pytest.approx(1.0)
    assert len(b["top"]) == 2 and "prompt" not in b["top"][0]
    zero = kl_breakdown([[0.0, 0.0], []])
    assert zero["first4_share"] is None and zero["top10pct_share"] is None and zero["median_prompt"] == 0.0
    assert kl_breakdown([])["positions"] == {}


def test_per_token_kl_sums_to_the_backends_kl(tiny_model, tiny_tok):
    import torch

    model = attach_new_patch(tiny_model, PatchShape(rank=2, alpha=8.0, target_modules=["up_proj"], layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    prompts = ["Write a poem about the sea.", "What is the capital of France?", "Hi"]
    res = kl_to_base(model, tiny_tok, prompts, GenerationConfig(max_new_tokens=5), batch_size=2, progress=False)
    assert res.rows and all(len(r["kl_by_position"]) == r["n_tokens"] for r in res.rows)
    # the summed per-token KL is what the backend's kl_to_base (modeling.scoring.answer_kl) computes
    gen = TransformersBackend(model, tiny_tok).generate(prompts, GenerationConfig(max_new_tokens=5), variant="base",
                                                       progress=False)
    eos = tiny_tok.eos_token_id
    answers = [list(g.token_ids) + ([eos] if g.finished else []) for g in gen]
    summed = TransformersBackend(model, tiny_tok).kl_to_base(prompts, answers, batch_size=2, progress=False)
    assert {r["index"]: r["kl_sum"] for r in res.rows} == pytest.approx({i: v for i, (v, _) in summed.items()},
                                                                         rel=1e-4, abs=1e-6)
    assert res.breakdown["per_token"] == pytest.approx(res.kl_per_token)
    assert res.breakdown["mean_prompt"] == pytest.approx(res.kl_per_prompt)


class SumsOnly(Backend):
    """A backend that gives only summed KL (no per-token values): no breakdown, the sums as before."""

    class tok:
        eos_token_id = None

    def generate(self, prompts, cfg=None, variant="patched", desc="", progress=True):
        return [Generation(text="ab", token_ids=[1, 2], finished=False) for _ in prompts]

    def kl_to_base(self, prompts, answers, batch_size=8, max_batch_tokens=0, progress=True):
        return {i: (0.5 * len(a), len(a)) for i, a in enumerate(answers)}


def test_a_backend_without_per_token_kl_gives_no_breakdown():
    res = measure_kl(SumsOnly(), ["a", "b"], progress=False)
    assert res.breakdown is None and res.kl_per_token == 0.5 and res.n_tokens == 4
    assert all("kl_by_position" not in r for r in res.rows)


def test_tiny_suite_writes_the_kl_breakdown(tiny_model_dir, tiny_patch, tmp_path, capsys):
    suite = tmp_path / "kl.yaml"
    suite.write_text(textwrap.dedent("""
        name: kl_only
        generation: {max_new_tokens: 6, batch_size: 4}
        entries:
          - {type: kl, name: kl_benign, benchmark: builtin_benign, limit: 4, sample: shuffle}
        """))
    out = tmp_path / "ev"
    rc = main(["eval", "--suite", str(suite), "--model", str(tiny_model_dir), "--patch", str(tiny_patch),
               "--out", str(out), "--no-db"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "kl_benign: KL by answer position: pos 0 " in captured.out + captured.err
    summary = json.loads((out / "summary.json").read_text())
    b = summary["entries"]["kl_benign"]["breakdown"]
    assert b["positions"]["0"] > 0 and 0 < b["first4_share"] <= 1 and len(b["top"]) == 4
    assert b["per_token"] == pytest.approx(summary["results"]["patched"]["kl_benign"]["-"]["-"]["kl_per_token"])
    assert {m["metric"] for m in summary["metrics"]} == {"kl_per_token", "kl_per_prompt"}  # the table is unchanged
    rows = [json.loads(line) for line in (out / "utility_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["kl_by_position"]) == r["n_tokens"] for r in rows)
    assert all(v == round(v, 4) for r in rows for v in r["kl_by_position"])
