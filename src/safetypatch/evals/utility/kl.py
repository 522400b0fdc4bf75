"""KL(base || patched) per token, teacher-forced on the base model's own greedy answers (the drift a patch causes on
prompts it should leave alone), through a backend's `generate` (base answers) and `kl_to_base`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ...config import GenerationConfig
from ...errors import ConfigError
from ...modeling import as_chat
from ...modeling.backends import Backend, TransformersBackend
from ...modeling.scoring import MAX_BATCH_TOKENS


@dataclass
class KLResult:
    kl_per_token: float  # pooled mean over all answer tokens
    kl_per_prompt: float  # mean over prompts of each prompt's mean per-token KL
    n_tokens: int
    n_prompts: int
    n_empty: int  # prompts whose base answer was empty (nothing to score)
    rows: list[dict[str, Any]] = field(default_factory=list)


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


def measure_kl(backend: Backend, prompts: Sequence[Any], gen: GenerationConfig | None = None, batch_size: int = 8,
               max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
               base_answers: Sequence[Any] | None = None) -> KLResult:
    """`kl_to_base` on any backend that computes KL(base || patched)."""
    chats = [as_chat(p) for p in prompts]
    if base_answers is None:
        gen = dataclasses.replace(gen or GenerationConfig(), do_sample=False)
        base_answers = backend.generate(chats, gen, variant="base", desc="KL: base answers", progress=progress)
    eos = backend.tok.eos_token_id
    answers = [list(g.token_ids) + ([eos] if g.finished and eos is not None else []) for g in base_answers]
    per_prompt = backend.kl_to_base(chats, answers, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                    progress=progress)
    total = sum(v for v, _ in per_prompt.values())  # summed in the order scored, as the pooled mean always was
    n_tok = sum(n for _, n in per_prompt.values())
    rows = [{"index": i, "kl_sum": per_prompt[i][0], "n_tokens": per_prompt[i][1],
             "kl_per_token": per_prompt[i][0] / per_prompt[i][1],
             "base_answer": base_answers[i].text} for i in sorted(per_prompt)]
    return KLResult(total / n_tok if n_tok else float("nan"),
                    sum(r["kl_per_token"] for r in rows) / len(rows) if rows else float("nan"),
                    n_tok, len(rows), len(chats) - len(per_prompt), rows)
