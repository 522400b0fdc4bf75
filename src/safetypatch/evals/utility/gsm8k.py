"""GSM8K exact match: greedy answers through a backend's `generate`, the last number against the gold answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ...config import GenerationConfig
from ...modeling.backends import Backend
from .data import NUMBER, GSMItem, normalize_number

GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer as a number after '####'."
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*", re.IGNORECASE)


def extract_answer(generation: str) -> str | None:
    """The predicted number of a GSM8K answer, normalised; None if there is none.

    In order: the first number after the last '####' (the format the prompt asks for, lm-evaluation-harness's
    'strict match'); else the first number after the last 'answer is' / 'answer:'; else the last number in the
    text ('flexible extract').
    """
    if "####" in generation:
        got = normalize_number(generation.rsplit("####", 1)[1])
        if got is not None:
            return got
    marks = list(_ANSWER_IS.finditer(generation))
    if marks:
        got = normalize_number(generation[marks[-1].end():])
        if got is not None:
            return got
    found = NUMBER.findall(generation)
    return normalize_number(found[-1]) if found else None


def gsm8k_chat(item: GSMItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{item.question}\n\n{GSM8K_INSTRUCTION}"}]


@dataclass
class GSMResult:
    exact_match: float
    n: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def score_gsm8k(items: Sequence[GSMItem], responses: Sequence[str]) -> GSMResult:
    """Exact match of the last number in each response against the gold answer."""
    rows = []
    for it, resp in zip(items, responses):
        pred = extract_answer(resp)
        rows.append({"id": it.id, "question": it.question, "response": resp, "pred": pred, "gold": it.gold,
                     "correct": pred is not None and pred == it.gold})
    n = len(rows)
    return GSMResult(sum(r["correct"] for r in rows) / n if n else float("nan"), n, rows)


def gsm8k_exact_match(backend: Backend, items: Sequence[GSMItem], gen: GenerationConfig | None = None,
                      variant: str = "patched", progress: bool = True) -> GSMResult:
    """Greedy answers of `variant` to each question, scored by `score_gsm8k`."""
    gen = gen or GenerationConfig(max_new_tokens=256)
    outs = backend.generate([gsm8k_chat(it) for it in items], gen, variant=variant, desc="gsm8k", progress=progress)
    return score_gsm8k(items, [g.text for g in outs])
