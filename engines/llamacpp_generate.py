"""Greedy generation with llama.cpp (llama-cpp-python) for the engine test and the throughput benchmark.

Runs in the llama.cpp venv (engines/install-llamacpp.sh), as its own process; it imports only the standard
library and llama_cpp (no torch, no safetypatch), so that venv stays small.

    .venv-llamacpp/bin/python engines/llamacpp_generate.py REQUEST.json RESPONSE.json

REQUEST.json:
    model_gguf       str    the base model, a .gguf file (e.g. the embedded SmolLM2-135M-Instruct Q4_1)
    lora_gguf        str    optional: a llama.cpp LoRA adapter (`safetypatch patch export --format gguf`)
    lora_scale       float  optional, default 1.0 (the adapter's own alpha / rank is applied by llama.cpp)
    prompts          list   one entry per prompt: a list of token ids (exactly the caller's tokens: the chat
                            template already applied, BOS included if the template has one; the way to make the
                            prompt identical to another engine's), or a string (prompt text with the template
                            applied; llama.cpp tokenizes it, special tokens such as <|im_start|> parsed)
    max_new_tokens   int    default 64
    n_threads        int    default 2
    n_ctx            int    default 2048
    stop_token_ids   list   optional: token ids that end an answer; default llama.cpp's end-of-generation tokens
    use_extra_bufts  bool   optional, default false: see EXTRA_BUFTS below
    verbose          bool   optional, default false: llama.cpp's load log (adapter tensors etc.) on stderr

RESPONSE.json:
    texts              list[str]        new text per prompt (stop token not included)
    token_ids          list[list[int]]  new token ids per prompt (stop token not included)
    finished           list[bool]       ended with a stop token (not cut at max_new_tokens)
    prompt_tokens      int              prompt tokens over all prompts
    new_tokens         int              generated tokens over all prompts (stop tokens not counted)
    seconds            float            wall time of generation (prompt evaluation included, model load not)
    tokens_per_second  float            new_tokens / seconds: one sequence at a time, batch size 1
    load_seconds       float            model (+ adapter) load
    engine_version     str              "llama-cpp-python X.Y.Z"
    use_extra_bufts, n_threads, lora_gguf   as used

Decoding is greedy (temperature 0: llama.cpp's greedy sampler; repeat penalty 1.0, i.e. off). Consecutive
prompts reuse the KV cache of their common token prefix (llama-cpp-python's own prefix matching), as our
transformers backend reuses the shared chat prefix.

EXTRA_BUFTS: llama.cpp's CPU backend may put weights into "extra" buffer types (AMX tiles, repacked layouts).
Issue 20 reports that on an AMX-capable CPU any prompt of 8+ tokens then segfaults in llama_decode, with or
without an adapter (llama.cpp's CLI: `--no-repack`). The Python wrapper has no argument for it; the driver turns
them off ALWAYS (use_extra_bufts=false; a request may set true): a segfault cannot be caught, and for the embedded
model it costs nothing: on the test machine (AMD EPYC, AVX-512, no AMX; the native build has no AMX buffer type)
llama.cpp reports that none of its Q4_1 / Q8_0 tensors can use CPU_REPACK, so the same buffers are used either
way (the crash did not occur there with them on either). For models whose tensors do get repacked (Q4_0, Q4_K,
IQ4_NL on AVX2) it costs the repacked kernels' prompt speed; pass use_extra_bufts: true there, where no AMX.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from driver_io import RequestError, driver_main, read_json_request

DEFAULTS = {"lora_gguf": None, "lora_scale": 1.0, "max_new_tokens": 64, "n_threads": 2, "n_ctx": 2048,
            "stop_token_ids": None, "use_extra_bufts": False, "verbose": False}


def read_request(path: str | Path) -> dict[str, Any]:
    """The request with defaults filled in; RequestError for a missing, unknown or ill-typed field."""
    req = read_json_request(path, DEFAULTS, ("model_gguf", "prompts"))
    for field in ("model_gguf",) + (("lora_gguf",) if req["lora_gguf"] else ()):
        if not isinstance(req.get(field), str) or not Path(req[field]).is_file():
            raise RequestError(f"request {path}: {field} must name an existing .gguf file (got {req.get(field)!r})")
    prompts = req.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p))
            for p in prompts):
        raise RequestError(f"request {path}: prompts must be a non-empty list of token-id lists or strings")
    return req


@contextlib.contextmanager
def model_params(**fields: Any) -> Iterator[None]:
    """Set llama_model_params fields for the Llama objects constructed inside the block.

    Written by hand because llama_cpp.Llama builds its llama_model_params inside __init__ (from
    llama_cpp.llama_cpp.llama_model_default_params, looked up at call time) and takes no argument for fields
    such as use_extra_bufts; the default-params function is wrapped for the block and restored after."""
    import llama_cpp.llama_cpp as lib

    known = {name for name, _ in lib.llama_model_params._fields_}
    missing = set(fields) - known
    if missing:
        raise RequestError(f"this llama-cpp-python has no llama_model_params field(s) {sorted(missing)}")
    original = lib.llama_model_default_params

    def patched() -> Any:
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def load(req: dict[str, Any]) -> Any:
    """The llama_cpp.Llama for a request (adapter attached when lora_gguf is given)."""
    from llama_cpp import Llama

    kwargs = {"n_ctx": req["n_ctx"], "n_threads": req["n_threads"], "n_threads_batch": req["n_threads"],
              "seed": 0, "verbose": bool(req["verbose"])}
    if req["lora_gguf"]:
        # use_mmap is switched off by llama-cpp-python itself when a LoRA path is given
        kwargs.update(lora_path=req["lora_gguf"], lora_scale=float(req["lora_scale"]))
    with model_params(use_extra_bufts=bool(req["use_extra_bufts"])):
        return Llama(req["model_gguf"], **kwargs)


def stop_tokens(llm: Any, req: dict[str, Any]) -> set[int]:
    if req["stop_token_ids"] is not None:
        return {int(t) for t in req["stop_token_ids"]}
    import llama_cpp.llama_cpp as lib

    vocab = llm._model.vocab  # noqa: SLF001  (the wrapper has no public accessor for the vocab handle)
    return {t for t in range(llm.n_vocab()) if lib.llama_vocab_is_eog(vocab, t)}


def generate_one(llm: Any, prompt: list[int], max_new: int, stop: set[int]) -> tuple[list[int], bool]:
    """Greedy new tokens for one prompt and whether a stop token ended them."""
    new: list[int] = []
    if max_new <= 0:
        return new, False
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in stop:
            return new, True
        new.append(int(token))
        if len(new) >= max_new:
            return new, False
    return new, False


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Generate for every prompt of a (checked) request; the response dict described in the module docstring."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = load(req)
    load_seconds = time.perf_counter() - t0
    prompts = [p if isinstance(p, list) else llm.tokenize(p.encode("utf-8"), add_bos=False, special=True)
               for p in req["prompts"]]
    too_long = [i for i, p in enumerate(prompts) if len(p) + req["max_new_tokens"] > req["n_ctx"]]
    if too_long:
        raise RequestError(f"prompt(s) {too_long}: prompt + max_new_tokens exceed n_ctx {req['n_ctx']}; "
                           "raise n_ctx in the request")
    stop = stop_tokens(llm, req)
    token_ids, finished = [], []
    t1 = time.perf_counter()
    for p in prompts:
        new, done = generate_one(llm, p, int(req["max_new_tokens"]), stop)
        token_ids.append(new)
        finished.append(done)
    seconds = time.perf_counter() - t1
    n_new = sum(len(t) for t in token_ids)
    texts = [llm.detokenize(t, special=False).decode("utf-8", errors="replace") for t in token_ids]
    return {"texts": texts, "token_ids": token_ids, "finished": finished,
            "prompt_tokens": sum(len(p) for p in prompts), "new_tokens": n_new, "seconds": round(seconds, 4),
            "tokens_per_second": round(n_new / seconds, 2) if seconds > 0 else None,
            "load_seconds": round(load_seconds, 3), "engine_version": f"llama-cpp-python {llama_cpp.__version__}",
            "use_extra_bufts": bool(req["use_extra_bufts"]), "n_threads": req["n_threads"],
            "lora_gguf": req["lora_gguf"]}


def main(argv: list[str] | None = None) -> int:
    # llama_cpp raises ValueError when a model or adapter fails to load
    return driver_main("llamacpp_generate", read_request, run, (ValueError,), argv)


if __name__ == "__main__":
    sys.exit(main())
