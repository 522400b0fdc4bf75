"""`kl` entries: KL(base || patched) per token on the base model's own answers to a prompt set (its base answers are
the ones generated for any other entry with the same prompts).

Metrics: `kl_per_token` (pooled) and `kl_per_prompt` (mean of the prompts' KL per token). Where that KL sits
(`evals.utility.kl.kl_breakdown`: mean KL by answer position, the share on the first 4 tokens, the share in the top
10 % of prompts, the top 5 prompts, the median prompt) is not a metric, so the suite table keeps one line per
metric: it goes to summary.json's `entries[NAME]["breakdown"]` (and the results DB's run config) and to one log
line; each utility row keeps its `kl_by_position` list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ....config import GenerationConfig
from ....modeling import Chat
from ...utility import measure_kl
from ...utility.kl import format_breakdown
from ..entry import Measured, Prepared, RunContext, register_entry_type
from .prompts import PromptEntry


@register_entry_type
@dataclass
class KLEntry(PromptEntry):
    type = "kl"
    scores = True
    metrics = ("kl_per_token",)
    needs_pair = True
    breakdown: ClassVar[dict[str, Any] | None] = None  # set per instance by `measure`, read by `describe`

    def requests(self, p: Prepared, variants: list[str], gen: GenerationConfig) -> list[tuple[str, int, list[Chat]]]:
        return [("base", self.max_new_tokens_for(gen), [r.chat() for r in p.items])]

    def measure(self, p: Prepared, run: RunContext) -> Measured:
        out = Measured()
        run.log(f"{self.name}: KL(base || patched) on {len(p.items)} base answers")
        m = self.max_new_tokens_for(run.gen)
        kl = measure_kl(run.backend, p.items, base_answers=[run.answer("base", m, r.chat()) for r in p.items],
                        progress=getattr(run, "progress", True))  # RunContext.progress where the job sets it
        for metric in ("kl_per_token", "kl_per_prompt"):
            out.metric("base", self.name, metric, 0.0, kl.n_tokens)  # KL(base || base) = 0 by definition
            out.metric("patched", self.name, metric, getattr(kl, metric), kl.n_tokens)
        self.breakdown = kl.breakdown
        if kl.breakdown is not None:
            run.log(f"{self.name}: KL by answer position: {format_breakdown(kl.breakdown)}")
        for row in kl.rows:
            r = p.items[row["index"]]
            out.utility.append({"model": "patched", "benchmark": self.name, "type": "kl", "prompt": r.prompt,
                                "response": row["base_answer"], "kl_per_token": row["kl_per_token"],
                                "n_tokens": row["n_tokens"], "id": r.meta.get("id"),
                                **({"kl_by_position": [round(v, 4) for v in row["kl_by_position"]]}
                                   if "kl_by_position" in row else {})})
        return out

    def describe(self, p: Prepared) -> dict[str, Any]:
        """PromptEntry's record, with the KL breakdown of the patched variant once measured."""
        d = super().describe(p)
        if self.breakdown is not None:
            d["breakdown"] = self.breakdown
        return d
