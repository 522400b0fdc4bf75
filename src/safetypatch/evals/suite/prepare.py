"""A suite run's settings, and preparing its entries: data loaded, items chosen, judges picked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...config import GenerationConfig
from ..backend import BackendChoice
from .entry import LoadContext, Prepared, default_data_root
from .schema import Suite


@dataclass
class SuiteRunConfig:
    """What `safetypatch eval --suite` was asked to do."""

    suite: str
    model: str = "default"
    patch: str | None = None
    finetuned: str | None = None  # a fully fine-tuned model dir, compared with `model` as its base
    data_root: str | None = None  # None: $SAFETYPATCH_DATA
    db: str | None = None  # None: $SAFETYPATCH_HOME/results.db
    record: bool = True  # record the run in the results DB
    judge_models: dict[str, str] = field(default_factory=dict)  # judge name (or '*') -> model spec
    limit: int | None = None  # caps every entry (smoke runs)
    max_new_tokens: int | None = None  # overrides the suite's generation settings
    batch_size: int | None = None
    name: str | None = None  # run name in the DB (default: the output directory's name)
    device: str | None = None  # e.g. "cuda"; None: where load_model puts it (CPU)
    chat_template: str = "auto"  # --chat-template: auto | plain | chatml | a Jinja file (data.templates)
    backend: BackendChoice = field(default_factory=BackendChoice)  # --backend transformers | vllm and its settings

    def data_root_or_default(self) -> str | None:
        return self.data_root if self.data_root is not None else default_data_root()


def prepare(suite: Suite, cfg: SuiteRunConfig, notes: list[str]) -> list[Prepared]:
    """Load every entry's data and choose its judges; a missing file or judge is a note, a bad file an error."""
    out: list[Prepared] = []
    for e in suite.entries:
        limit = min(x for x in (e.limit, cfg.limit) if x) if (e.limit or cfg.limit) else None
        ctx = LoadContext(root=cfg.data_root_or_default(), limit=limit, notes=notes, suite_source=suite.source,
                          suite_judges=suite.judges, judge_models=cfg.judge_models)
        p = e.load(ctx)
        if p is not None:
            out.append(p)
    return out


def generation_config(suite: Suite, cfg: SuiteRunConfig) -> GenerationConfig:
    """The suite's generation settings with the run's --max-new-tokens / --batch-size."""
    return dataclasses.replace(suite.generation, **{k: v for k, v in (("max_new_tokens", cfg.max_new_tokens),
                                                                      ("batch_size", cfg.batch_size)) if v})


def drop_unpaired(prepared: list[Prepared], notes: list[str]) -> list[Prepared]:
    """A base-only run: entries that compare base with patched are skipped with a note."""
    for p in prepared:
        if p.entry.needs_pair:
            notes.append(f"skipped {p.entry.name}: KL to base needs --patch or --finetuned")
    return [p for p in prepared if not p.entry.needs_pair]
