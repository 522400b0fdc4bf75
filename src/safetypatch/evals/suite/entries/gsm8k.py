"""`gsm8k` entries: exact match of the last number of each greedy answer (256 new tokens unless the entry says)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ....config import GenerationConfig
from ....modeling import Chat
from ...utility import gsm8k_chat, load_gsm8k, score_gsm8k
from ..entry import Measured, Prepared, RunContext, SuiteEntry, register_entry_type

GSM8K_MAX_NEW_TOKENS = 256


@register_entry_type
@dataclass
class GSM8KEntry(SuiteEntry):
    type = "gsm8k"
    metrics = ("exact_match",)

    max_new_tokens: int | None = field(default=None, metadata={"parse": "positive_int"})

    def load_items(self, local: Path) -> list[Any]:
        return load_gsm8k(local)

    def max_new_tokens_for(self, gen: GenerationConfig) -> int:
        return self.max_new_tokens or GSM8K_MAX_NEW_TOKENS

    def requests(self, p: Prepared, variants: list[str], gen: GenerationConfig) -> list[tuple[str, int, list[Chat]]]:
        chats = [gsm8k_chat(it) for it in p.items]
        return [(v, self.max_new_tokens_for(gen), chats) for v in variants]

    def measure(self, p: Prepared, run: RunContext) -> Measured:
        out = Measured()
        m = self.max_new_tokens_for(run.gen)
        for v in run.variants:
            res = score_gsm8k(p.items, [run.answer(v, m, gsm8k_chat(it)).text for it in p.items])
            out.metric(v, self.name, "exact_match", res.exact_match, res.n)
            for row in res.rows:
                out.utility.append({"model": v, "benchmark": self.name, "type": "gsm8k",
                                    "prompt": row.pop("question"), **row})
        return out
