"""KL(base || patched) per token, teacher-forced on the base model's own greedy answers (the drift a patch causes on
prompts it should leave alone), through a backend's `generate` (base answers) and `kl_to_base`, with a breakdown of
where that KL sits: by position in the answer, and by prompt (`kl_breakdown`)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from ...config import GenerationConfig
from ...errors import ConfigError
from ...modeling import as_chat
from ...modeling.backends import Backend, TransformersBackend
from ...modeling.scoring import MAX_BATCH_TOKENS, answer_kl_tokens
from ..backend import ScoringFallback

# Answer-position buckets of the breakdown: (first, last) positions, last None = open-ended.
POSITION_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, None))
FIRST_TOKENS = 4  # kl_breakdown's `first4_share`: the KL on answer positions 0..3
TOP_FRACTION = 0.10  # kl_breakdown's `top10pct_share`: the top 10 % of prompts by summed KL (at least one)


@dataclass
class KLResult:
    kl_per_token: float  # pooled mean over all answer tokens
    kl_per_prompt: float  # mean over prompts of each prompt's mean per-token KL
    n_tokens: int
    n_prompts: int
    n_empty: int  # prompts whose base answer was empty (nothing to score)
    # rows: index, kl_sum, n_tokens, kl_per_token, base_answer, and kl_by_position (the per-token KL list) when the
    # backend computes one (the transformers backend, or vLLM's transformers scorer)
    rows: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, Any] | None = None  # kl_breakdown of the rows' kl_by_position; None without them


def bucket_name(first: int, last: int | None) -> str:
    return str(first) if first == last else f"{first}+" if last is None else f"{first}-{last}"


def kl_breakdown(rows: Sequence[Sequence[float]], prompts: Sequence[str] | None = None, top: int = 5,
                 ) -> dict[str, Any]:
    """Where KL sits, from per-prompt lists of per-token KL (rows[i][t]: prompt i, answer position t; an empty list
    is a prompt with nothing scored and is left out of the per-prompt figures, but keeps its index).

    Returns: `positions` {bucket: mean KL per token} and `position_tokens` {bucket: tokens} for the buckets of
    POSITION_BUCKETS that have tokens; `first4_share` (share of all KL on positions 0..3) next to
    `first4_token_share` (their share of the tokens); `top10pct_share` (share of all KL in the top 10 % of prompts
    by summed KL, `top10pct_prompts` of them); `top` (the `top` prompts by summed KL: index, kl_per_token, kl_sum,
    n_tokens, and `prompt`'s first 60 characters when prompts are given); `mean_prompt` / `median_prompt` (of the
    per-prompt KL per token); `per_token` (pooled). Shares are None when there is no KL at all (total 0)."""
    scored = [(i, list(r)) for i, r in enumerate(rows) if len(r)]
    total = sum(sum(r) for _, r in scored)
    n_tok = sum(len(r) for _, r in scored)
    positions, counts = {}, {}
    for first, last in POSITION_BUCKETS:
        vals = [v for _, r in scored for v in r[first:None if last is None else last + 1]]
        if vals:
            positions[bucket_name(first, last)] = sum(vals) / len(vals)
            counts[bucket_name(first, last)] = len(vals)
    first_kl = sum(sum(r[:FIRST_TOKENS]) for _, r in scored)
    ranked = sorted(scored, key=lambda x: -sum(x[1]))
    n_top = max(1, math.ceil(TOP_FRACTION * len(scored))) if scored else 0
    per_prompt = [sum(r) / len(r) for _, r in scored]

    def share(x: float) -> float | None:
        return x / total if total > 0 else None

    return {"positions": positions, "position_tokens": counts, "first4_share": share(first_kl),
            "first4_token_share": sum(min(len(r), FIRST_TOKENS) for _, r in scored) / n_tok if n_tok else None,
            "top10pct_share": share(sum(sum(r) for _, r in ranked[:n_top])), "top10pct_prompts": n_top,
            "top": [{"index": i, "kl_per_token": sum(r) / len(r), "kl_sum": sum(r), "n_tokens": len(r),
                     **({"prompt": str(prompts[i])[:60]} if prompts is not None else {})} for i, r in ranked[:top]],
            "mean_prompt": statistics.fmean(per_prompt) if per_prompt else None,
            "median_prompt": statistics.median(per_prompt) if per_prompt else None,
            "per_token": total / n_tok if n_tok else None}


def format_breakdown(b: dict[str, Any]) -> str:
    """kl_breakdown on one line: 'pos 0 .41 | 1 .2 | ... ; first4 35% of KL (6% of tokens); top10% prompts 40%;
    prompt median .1 mean .2'."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    pos = " | ".join(f"{k} {v:.3g}" for k, v in b["positions"].items())
    return (f"pos {pos}; first4 {pct(b['first4_share'])} of KL ({pct(b['first4_token_share'])} of tokens); "
            f"top {b['top10pct_prompts']} prompts {pct(b['top10pct_share'])} of KL; per prompt median "
            f"{b['median_prompt'] or 0:.3g} mean {b['mean_prompt'] or 0:.3g}")


def kl_to_base(model: Any, tok: Any, prompts: Sequence[Any], gen: GenerationConfig | None = None,
               batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
               base_answers: Sequence[Any] | None = None) -> KLResult:
    """KL(base || patched) per token on the base model's own greedy answers (teacher-forced).

    `model` is one PEFT model (or a FinetunedPair): base = the adapter switched off, patched = as it is. The answer
    tokens include the end-of-turn token when the base answer finished. `base_answers` (objects with .token_ids,
    .finished, .text, e.g. Generation) skips the base generation when already done.
    """
    if not hasattr(model, "disable_adapter"):
        raise ConfigError("KL to base needs a patched model (a PEFT model with an adapter); give --patch")
    return measure_kl(TransformersBackend(model, tok), prompts, gen, batch_size, max_batch_tokens, progress,
                      base_answers)


def score_answers(backend: Backend, chats: list[Any], answers: list[list[int]], batch_size: int,
                  max_batch_tokens: int, progress: bool) -> tuple[dict[int, tuple[float, int]], dict[int, list[float]]]:
    """({index: (KL sum, tokens)}, {index: per-token KL}) of the non-empty answers; the per-token lists only where
    the backend is (or scores with) the transformers backend, else {}."""
    scorer = backend.scorer() if isinstance(backend, ScoringFallback) else backend
    if isinstance(scorer, TransformersBackend):
        by_pos = answer_kl_tokens(scorer.model, scorer.tok, chats, answers, batch_size, max_batch_tokens, progress)
        return {i: (sum(v), len(v)) for i, v in by_pos.items()}, by_pos
    return backend.kl_to_base(chats, answers, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                              progress=progress), {}


def measure_kl(backend: Backend, prompts: Sequence[Any], gen: GenerationConfig | None = None, batch_size: int = 8,
               max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
               base_answers: Sequence[Any] | None = None) -> KLResult:
    """`kl_to_base` on any backend that computes KL(base || patched); with the per-token breakdown where the
    backend gives per-token values (`score_answers`)."""
    chats = [as_chat(p) for p in prompts]
    if base_answers is None:
        gen = dataclasses.replace(gen or GenerationConfig(), do_sample=False)
        base_answers = backend.generate(chats, gen, variant="base", desc="KL: base answers", progress=progress)
    eos = backend.tok.eos_token_id
    answers = [list(g.token_ids) + ([eos] if g.finished and eos is not None else []) for g in base_answers]
    per_prompt, by_pos = score_answers(backend, chats, answers, batch_size, max_batch_tokens, progress)
    total = sum(v for v, _ in per_prompt.values())
    n_tok = sum(n for _, n in per_prompt.values())
    rows = [{"index": i, "kl_sum": per_prompt[i][0], "n_tokens": per_prompt[i][1],
             "kl_per_token": per_prompt[i][0] / per_prompt[i][1], "base_answer": base_answers[i].text,
             **({"kl_by_position": by_pos[i]} if i in by_pos else {})} for i in sorted(per_prompt)]
    breakdown = None
    if by_pos:
        texts = [next((m["content"] for m in reversed(c) if m["role"] == "user"), "") for c in chats]
        breakdown = kl_breakdown([by_pos.get(i, []) for i in range(len(chats))], texts)
    return KLResult(total / n_tok if n_tok else float("nan"),
                    sum(r["kl_per_token"] for r in rows) / len(rows) if rows else float("nan"),
                    n_tok, len(rows), len(chats) - len(per_prompt), rows, breakdown)
