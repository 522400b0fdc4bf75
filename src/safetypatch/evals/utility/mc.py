"""Multiple-choice accuracy by the log-likelihood of each choice's continuation (lm-evaluation-harness style), through
a backend's `loglikelihood`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ...modeling.backends import Backend
from .data import LETTERS, MCItem


def mc_context(item: MCItem, style: str) -> tuple[str, list[str]]:
    """The context and the continuation of each choice, in lm-evaluation-harness's MMLU / ARC prompt formats."""
    if style == "letter":
        subject = item.subject.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
        body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        return f"{head}{item.question}\n{body}\nAnswer:", [f" {LETTERS[i]}" for i in range(len(item.choices))]
    if style == "text":
        return f"Question: {item.question}\nAnswer:", [f" {c}" for c in item.choices]
    raise ValueError(f"unknown multiple-choice style '{style}' (letter | text)")


@dataclass
class MCResult:
    accuracy: float
    accuracy_norm: float | None  # choice log-likelihood / its length in bytes ('text' style only)
    n: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def mc_accuracy(backend: Backend, items: Sequence[MCItem], style: str = "letter", variant: str = "patched",
                batch_size: int = 16, progress: bool = True, desc: str = "multiple choice") -> MCResult:
    """Accuracy of `variant`: the choice whose continuation is most likely; ties go to the first choice."""
    pairs: list[tuple[str, str]] = []
    spans = []
    for it in items:
        ctx, conts = mc_context(it, style)
        spans.append((len(pairs), len(conts)))
        pairs.extend((ctx, c) for c in conts)
    scores = backend.loglikelihood(pairs, variant, batch_size=batch_size, progress=progress, desc=desc)
    rows, correct, correct_norm = [], 0, 0
    for it, (start, k) in zip(items, spans):
        lls = [scores[start + j][0] for j in range(k)]
        conts = [pairs[start + j][1] for j in range(k)]
        pred = max(range(k), key=lambda j: lls[j])
        normed = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, conts)]
        pred_norm = max(range(k), key=lambda j: normed[j])
        correct += pred == it.answer
        correct_norm += pred_norm == it.answer
        rows.append({"id": it.id, "subject": it.subject, "gold": it.answer, "pred": pred,
                     "correct": pred == it.answer, "loglik": [round(x, 4) for x in lls]})
    n = len(items)
    return MCResult(correct / n if n else float("nan"), (correct_norm / n if n else None) if style == "text" else None,
                    n, rows)
