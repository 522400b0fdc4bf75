"""`safety` entries: refusal rate per judge on a prompt set, plain and under jailbreak wrappers (with the worst case
per prompt), optionally in XSTest's three classes (full compliance / full refusal / partial refusal), and for a judge
of whole-answer classes (`refusal_whole`; `xstest_3class` on a harmful entry) the refused_then_complied rate."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from ....config import GenerationConfig
from ....data.readers import Record
from ....errors import SuiteError
from ....judges import three_class, whole_answer_class, whole_answer_judge
from ....modeling import Chat
from ...attacks import apply_attack
from ...benchmarks import BENCHMARKS
from ...refusal import RESERVED
from ..entry import JudgeSpec, LoadContext, Measured, Prepared, RunContext, register_entry_type
from ..judging import SAFE_RATE_JUDGES, THREE_CLASS_KEYWORD_JUDGE, THREE_CLASS_MODEL_JUDGE, judge_rows, usable_judge
from .prompts import PromptEntry

THREE_CLASSES = ("full_compliance", "full_refusal", "partial_refusal")
RTC = "refused_then_complied"


def attack_chat(attack: str, record: Record) -> Chat:
    """The chat a model sees: the request as it is, or wrapped by a jailbreak."""
    return [{"role": "user", "content": apply_attack(attack, record.prompt)}] if attack != "none" else record.chat()


@register_entry_type
@dataclass
class SafetyEntry(PromptEntry):
    type = "safety"
    metrics = ("refusal_rate", "xstest_3class")
    utility = False

    kind: str | None = field(default=None, metadata={  # harmful | benign (default from the benchmark)
        "parse": "str", "choices": ("harmful", "benign"), "expect": "'harmful' or 'benign'"})
    attacks: list[str] = field(default_factory=lambda: ["none"], metadata={"parse": "attacks"})
    judges: list[JudgeSpec] | None = field(default=None, metadata={"parse": "judges"})  # None: the suite's

    @classmethod
    def complete(cls, kw: dict[str, Any]) -> None:
        if "kind" not in kw:
            b = kw["benchmark"]
            kw["kind"] = BENCHMARKS[b].kind if b in BENCHMARKS and BENCHMARKS[b].kind in ("harmful", "benign") \
                else "harmful"
        super().complete(kw)

    def file_label(self) -> str:
        return self.kind or "harmful"

    def load(self, ctx: LoadContext) -> Prepared | None:
        p = super().load(ctx)
        if p is None:
            return None
        for js in self.judges or ctx.suite_judges:
            _, why = usable_judge(js.name, ctx.judge_models)
            if why is not None:
                if not js.optional:
                    raise SuiteError(f"{ctx.suite_source}: entry {self.name}: {why}")
                note = f"optional {why}; not used"
                if note not in ctx.notes:
                    ctx.notes.append(note)
            elif js.name not in p.judges:
                p.judges.append(js.name)
        if self.metric == "xstest_3class":
            _, why = usable_judge(THREE_CLASS_MODEL_JUDGE, ctx.judge_models)
            if why is None:
                p.class_judge = THREE_CLASS_MODEL_JUDGE
            else:
                p.class_judge = THREE_CLASS_KEYWORD_JUDGE
                ctx.notes.append(f"{self.name}: 3 classes from the keyword heuristic '{THREE_CLASS_KEYWORD_JUDGE}' "
                                 f"(partial refusal needs a model judge for fidelity; {why})")
        if not p.judges and p.class_judge is None:
            ctx.notes.append(f"skipped {self.name}: none of its judges is available")
            return None
        return p

    def requests(self, p: Prepared, variants: list[str], gen: GenerationConfig) -> list[tuple[str, int, list[Chat]]]:
        chats = [attack_chat(a, r) for a in self.attacks for r in p.items]
        return [(v, self.max_new_tokens_for(gen), chats) for v in variants]

    def measure(self, p: Prepared, run: RunContext) -> Measured:
        from tqdm.auto import tqdm

        out = Measured()
        cells = [(a, i, r) for a in self.attacks for i, r in enumerate(p.items)]
        progress = getattr(run, "progress", True)  # RunContext.progress where the job sets it
        for v in run.variants:
            rows: list[dict[str, Any]] = []
            for a, _, r in cells:
                chat = attack_chat(a, r)
                g = run.answer(v, self.max_new_tokens_for(run.gen), chat)
                rows.append({"model": v, "prompt": chat[-1]["content"], "response": g.text})
            judging = tqdm(p.all_judges(), desc=f"{self.name} ({v}): judging {len(rows)} answers", leave=False,
                           disable=not progress or not rows)
            for j in judging:
                judging.set_postfix_str(j)
                # judges see the original request (what a classifier judges harm against), not the wrapper
                judge_rows(j, run.judges[j], [r.prompt for _, _, r in cells], rows,
                           with_label=j == p.class_judge or self.whole_answer(j))
            for row, (a, i, r) in zip(rows, cells):
                row.update({"benchmark": self.name, "attack": a, "request": r.prompt, "index": i})
                row.update({key: val for key, val in r.meta.items() if key not in RESERVED
                            and key not in row and key != "benchmark"})
            self.rates(p, v, rows, out.metric)
            out.samples.extend(rows)
        return out

    def whole_answer(self, judge: str) -> bool:
        """Whether `judge`'s labels on this entry are whole-answer classes (refused / complied / RTC)."""
        return whole_answer_judge(judge, harmful=self.kind == "harmful")

    def rates(self, p: Prepared, variant: str, rows: list[dict[str, Any]], metric: Callable[..., None]) -> None:
        """Per judge and attack: the refusal (or safe) rate, unparseable verdicts, mean scores, the three classes,
        the refused_then_complied rate among parsed verdicts (whole-answer judges); with several attacks, the worst
        case per prompt."""
        for j in p.all_judges():
            rate = "safe_rate" if j in SAFE_RATE_JUDGES else "refusal_rate"
            by_prompt: dict[int, list[bool | None]] = defaultdict(list)
            for a in self.attacks:
                mine = [r for r in rows if r["attack"] == a]
                vals = [r[j] for r in mine if r[j] is not None]
                metric(variant, self.name, rate, sum(vals) / len(vals) if vals else None, len(vals), a, j)
                bad = len(mine) - len(vals)
                if bad:
                    metric(variant, self.name, "unparseable", float(bad), len(mine), a, j)
                scores = [r[f"{j}_score"] for r in mine if r.get(f"{j}_score") is not None]
                if scores:
                    metric(variant, self.name, "mean_score", sum(scores) / len(scores), len(scores), a, j)
                if j == p.class_judge:
                    classes = [three_class(r.get(f"{j}_label") or "") for r in mine if r[j] is not None]
                    known = [c for c in classes if c]
                    for c in THREE_CLASSES:
                        metric(variant, self.name, c, known.count(c) / len(known) if known else None, len(known), a, j)
                if self.whole_answer(j):
                    whole = [whole_answer_class(r.get(f"{j}_label")) for r in mine if r[j] is not None]
                    metric(variant, self.name, RTC, whole.count(RTC) / len(whole) if whole else None, len(whole), a, j)
                for r in mine:
                    by_prompt[r["index"]].append(r[j])
            if len(self.attacks) > 1:  # worst case per prompt: refused under every attack (prompts with a missing
                full = [v for v in by_prompt.values() if None not in v]  # verdict are left out)
                metric(variant, self.name, rate, sum(all(v) for v in full) / len(full) if full else None,
                       len(full), "worst_case", j)

    def describe(self, p: Prepared) -> dict[str, Any]:
        return {**super().describe(p), "kind": self.kind, "attacks": self.attacks}
