"""The registry of suite entry types, and what every entry type shares.

An entry type is one `SuiteEntry` subclass in one file, registered with `@register_entry_type`: its dataclass
fields are the YAML fields it accepts (field metadata `parse` says how a value is checked, `choices` / `expect`
which values are allowed), `metrics` its metrics (the first is the default), and its methods say how it loads its
data (`load`), which answers it needs generated (`requests`; identical prompts across entries are generated
once; `followups`: a second round built from the first round's answers, e.g. prefilled with them) and how it
measures (`measure`). Examples in `entries/`: `mc.py` (log-likelihood), `gsm8k.py`
(generation), `safety.py` (judged generations).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

from ...config import GenerationConfig
from ...data.paths import path_exists
from ...errors import SuiteError
from ...judges import Judge
from ...modeling import Chat, Generation
from ...modeling.backends import Backend

SAMPLING = ("stratified", "shuffle", "first")
ENTRY_TYPES: dict[str, type[SuiteEntry]] = {}
E = TypeVar("E", bound="type[SuiteEntry]")


def register_entry_type(cls: E) -> E:
    """Class decorator: make `cls` (a SuiteEntry subclass with a `type` name) usable as `type: NAME` in a suite."""
    ENTRY_TYPES[cls.type] = cls
    return cls


@dataclass
class JudgeSpec:
    name: str
    optional: bool = False


@dataclass
class LoadContext:
    """What an entry's `load` may use: the data root, the run's cap on items, the notes of the run, the suite."""

    root: str | None
    limit: int | None
    notes: list[str]
    suite_source: str
    suite_judges: list[JudgeSpec]
    judge_models: dict[str, str]


@dataclass
class Prepared:
    """An entry with its data loaded: prompts (`Record`s) or items, and the judges chosen for it."""

    entry: SuiteEntry
    items: list[Any]
    source: str
    judges: list[str] = field(default_factory=list)
    class_judge: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what measuring found out, for `describe`

    def all_judges(self) -> list[str]:
        return self.judges + ([self.class_judge] if self.class_judge else [])


@dataclass
class RunContext:
    """What an entry's `measure` may use: the backend, the variants compared, every generated answer, the judges."""

    backend: Backend
    variants: list[str]
    gen: GenerationConfig
    answers: dict[tuple[str, int, str], Generation]
    judges: dict[str, Judge]
    log: Callable[[str], None]

    def answer(self, variant: str, max_new_tokens: int, chat: Chat) -> Generation:
        return self.answers[(variant, max_new_tokens, chat_key(chat))]


@dataclass
class Measured:
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # safety rows (samples.jsonl)
    utility: list[dict[str, Any]] = field(default_factory=list)  # utility rows (utility_samples.jsonl)

    def metric(self, variant: str, bench: str, metric: str, value: float | None, n: int | None, attack: str = "",
               judge: str = "") -> None:
        self.metrics.append({"variant": variant, "benchmark": bench, "attack": attack, "judge": judge,
                             "metric": metric, "value": value, "n": n})


@dataclass
class SuiteEntry:
    """One measurement of a suite: the fields every entry type has. Subclasses add theirs (see the module doc)."""

    type: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()  # allowed values of `metric`; the first is the default
    needs_pair: ClassVar[bool] = False  # compares base with patched itself: skipped in a base-only run
    utility: ClassVar[bool] = True  # measured (and reported) after the safety entries
    scores: ClassVar[bool] = False  # needs log-likelihoods / KL (a generation-only backend hands them on)

    name: str = field(default="", metadata={"parse": "str"})
    limit: int | None = field(default=None, metadata={"parse": "positive_int"})
    metric: str = ""
    sample: str = field(default="stratified", metadata={  # how `limit` items are chosen
        "parse": "str", "choices": SAMPLING, "expect": f"one of {SAMPLING}"})
    stratify_by: str = field(default="category", metadata={"parse": "str"})
    seed: int = field(default=0, metadata={"parse": "int"})
    path: str | None = field(default=None, metadata={"parse": "str"})  # data file, relative to the data root

    @classmethod
    def check_source(cls, kw: dict[str, Any], where: str) -> None:
        """Where the entry's data comes from must be given (called while parsing)."""
        if not kw.get("path"):
            raise SuiteError(f"{where}: field 'path' is missing (the {cls.type} data file, relative to the data root)")

    @classmethod
    def complete(cls, kw: dict[str, Any]) -> None:
        """Defaults that depend on other fields (called after parsing)."""
        kw.setdefault("name", kw.get("benchmark") or f"{cls.type}:{Path(kw['path']).name}")

    def data_id(self) -> str:
        """What the sampling seed is mixed with: the same data gets the same order."""
        return str(self.path)

    def stratum(self, item: Any) -> str:
        return ""

    def load_items(self, local: Path) -> list[Any]:
        raise NotImplementedError

    def load(self, ctx: LoadContext) -> Prepared | None:
        """The entry's items (None, with a note, when its file is missing)."""
        local = data_path(str(self.path), ctx.root)
        if not path_exists(local):
            hint = "" if ctx.root else " (relative paths are read under --data-root / $SAFETYPATCH_DATA)"
            ctx.notes.append(f"skipped {self.name}: {local} not found{hint}")
            return None
        return Prepared(self, select(self.load_items(local), self, ctx.limit, self.stratum), str(local))

    def max_new_tokens_for(self, gen: GenerationConfig) -> int:
        return gen.max_new_tokens

    def requests(self, p: Prepared, variants: list[str], gen: GenerationConfig) -> list[tuple[str, int, list[Chat]]]:
        """(variant, max_new_tokens, chats) the entry needs answers for; none by default."""
        return []

    def followups(self, p: Prepared, variants: list[str], gen: GenerationConfig,
                  answers: dict[tuple[str, int, str], Generation], tok: Any) -> list[tuple[str, int, list[Chat]]]:
        """(variant, max_new_tokens, chats) generated after every entry's `requests`, from their `answers`; `tok`
        is the backend's tokenizer (None when it has none). None by default."""
        return []

    def measure(self, p: Prepared, run: RunContext) -> Measured:
        raise NotImplementedError

    def describe(self, p: Prepared) -> dict[str, Any]:
        """The entry's record in summary.json's `entries` (and the results DB's run config)."""
        return {"type": self.type, "kind": None, "n": len(p.items), "source": p.source, "judges": p.judges,
                "class_judge": p.class_judge, "attacks": None}


def default_data_root() -> str | None:
    return os.environ.get("SAFETYPATCH_DATA") or None


def data_path(path: str, root: str | None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or root is None:
        return p
    return Path(root).expanduser() / p


def chat_key(chat: Chat) -> str:
    return json.dumps(chat, sort_keys=True, ensure_ascii=False)


def select(records: Sequence[Any], entry: SuiteEntry, limit: int | None, key: Callable[[Any], str]) -> list[Any]:
    """`limit` items, chosen deterministically: round-robin over strata (each shuffled with the seed), a seeded
    shuffle, or the first ones. A smaller limit always picks a prefix of what a larger one picks."""
    if entry.sample == "first" or not limit or limit >= len(records):
        return list(records[:limit]) if limit else list(records)
    rng = random.Random(f"{entry.seed}:{entry.data_id()}")  # same data, same order: prefixes
    if entry.sample == "shuffle":
        out = list(records)
        rng.shuffle(out)
        return out[:limit]
    strata: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        strata[key(r)].append(r)
    groups = [strata[k] for k in sorted(strata)]
    for g in groups:
        rng.shuffle(g)
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out[:limit]
