"""`mc` entries: multiple-choice accuracy by log-likelihood (MMLU CSVs in `letter` style, ARC-like JSONL in `text`
style, which also reports length-normalised accuracy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...utility import LETTERS, MCItem, load_mc_jsonl, load_mmlu, mc_accuracy
from ..entry import Measured, Prepared, RunContext, SuiteEntry, register_entry_type


@register_entry_type
@dataclass
class MCEntry(SuiteEntry):
    type = "mc"
    scores = True
    metrics = ("accuracy",)

    style: str = field(default="letter", metadata={  # letter (MMLU) | text (ARC-like)
        "parse": "str", "choices": ("letter", "text"), "expect": "'letter' (MMLU) or 'text' (ARC-like)"})
    subjects: list[str] | None = field(default=None, metadata={"parse": "names"})  # on an MMLU directory

    def load_items(self, local: Path) -> list[Any]:
        if local.is_dir() or local.suffix == ".csv":
            return load_mmlu(local, self.subjects)
        return load_mc_jsonl(local)

    def stratum(self, item: MCItem) -> str:  # stratified: round-robin over subjects
        return item.subject

    def measure(self, p: Prepared, run: RunContext) -> Measured:
        out = Measured()
        for v in run.variants:
            run.log(f"{v}: {self.name}: {len(p.items)} multiple-choice questions")
            res = mc_accuracy(run.backend, p.items, style=self.style, variant=v, desc=f"{self.name} ({v})",
                              progress=getattr(run, "progress", True))  # RunContext.progress where the job sets it
            out.metric(v, self.name, "accuracy", res.accuracy, res.n)
            if res.accuracy_norm is not None:
                out.metric(v, self.name, "accuracy_norm", res.accuracy_norm, res.n)
            for it, row in zip(p.items, res.rows):
                out.utility.append({"model": v, "benchmark": self.name, "type": "mc", "prompt": it.question,
                                    "response": LETTERS[row["pred"]], **row})
        return out
