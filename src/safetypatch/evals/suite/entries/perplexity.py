"""`perplexity` entries: perplexity (and mean NLL per token) on a text set, each text cut to `max_length` tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...utility import load_texts, perplexity
from ..entry import Measured, Prepared, RunContext, SuiteEntry, register_entry_type


@register_entry_type
@dataclass
class PerplexityEntry(SuiteEntry):
    type = "perplexity"
    scores = True
    metrics = ("perplexity",)

    text_field: str = field(default="text", metadata={"parse": "str"})
    max_length: int = field(default=512, metadata={"parse": "positive_int"})  # tokens per text

    def load_items(self, local: Path) -> list[Any]:
        return load_texts(local, self.text_field)

    def measure(self, p: Prepared, run: RunContext) -> Measured:
        out = Measured()
        for v in run.variants:
            run.log(f"{v}: {self.name}: perplexity on {len(p.items)} texts")
            res = perplexity(run.backend, p.items, variant=v, max_length=self.max_length,
                             progress=getattr(run, "progress", True))  # RunContext.progress where the job sets it
            out.metric(v, self.name, "perplexity", res.perplexity, res.n_tokens)
            out.metric(v, self.name, "nll_per_token", res.nll_per_token, res.n_tokens)
        return out
