"""`kl` entries: KL(base || patched) per token on the base model's own answers to a prompt set (its base answers are
the ones generated for any other entry with the same prompts)."""

from __future__ import annotations

from dataclasses import dataclass

from ....config import GenerationConfig
from ....modeling import Chat
from ...utility import measure_kl
from ..entry import Measured, Prepared, RunContext, register_entry_type
from .prompts import PromptEntry


@register_entry_type
@dataclass
class KLEntry(PromptEntry):
    type = "kl"
    scores = True
    metrics = ("kl_per_token",)
    needs_pair = True

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
        for row in kl.rows:
            r = p.items[row["index"]]
            out.utility.append({"model": "patched", "benchmark": self.name, "type": "kl", "prompt": r.prompt,
                                "response": row["base_answer"], "kl_per_token": row["kl_per_token"],
                                "n_tokens": row["n_tokens"], "id": r.meta.get("id")})
        return out
