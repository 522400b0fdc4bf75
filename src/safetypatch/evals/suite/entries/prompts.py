"""Entries over prompts (safety, kl): a registered benchmark, or `file:PATH`, read as `Record`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ....config import GenerationConfig
from ....data.paths import path_exists
from ....data.readers import Record, read_records
from ....errors import SuiteError
from ...benchmarks import BENCHMARKS, load_benchmark
from ..entry import LoadContext, Prepared, SuiteEntry, data_path, select


@dataclass
class PromptEntry(SuiteEntry):
    benchmark: str | None = field(default=None, metadata={"parse": "str"})  # a registered benchmark or file:PATH
    prompt_field: str = field(default="prompt", metadata={"parse": "str"})
    max_new_tokens: int | None = field(default=None, metadata={"parse": "positive_int"})  # None: the suite's

    @classmethod
    def check_source(cls, kw: dict[str, Any], where: str) -> None:
        b = kw.get("benchmark")
        if not b:
            raise SuiteError(f"{where}: field 'benchmark' is missing (a registered benchmark or file:PATH)")
        if not b.startswith("file:") and b not in BENCHMARKS:
            raise SuiteError(f"{where}: unknown benchmark '{b}'; available: {', '.join(sorted(BENCHMARKS))} "
                             "or file:PATH")

    def data_id(self) -> str:
        return str(self.benchmark or self.path)

    def stratum(self, item: Any) -> str:
        return str(item.meta.get(self.stratify_by, ""))

    def file_label(self) -> str:
        """The `label` of prompts read from a `file:` benchmark."""
        return "harmful"

    def max_new_tokens_for(self, gen: GenerationConfig) -> int:
        return self.max_new_tokens or gen.max_new_tokens

    def local_file(self, ctx: LoadContext) -> tuple[Path | None, str | None]:
        """(the file to read, None) or (None, why the entry is skipped); (None, None): the benchmark needs no file."""
        assert self.benchmark is not None
        if self.benchmark.startswith("file:"):
            local: Path | None = data_path(self.benchmark[5:], ctx.root)
        elif self.path:
            local = data_path(self.path, ctx.root)
        else:
            spec = BENCHMARKS[self.benchmark]
            local = data_path(spec.default_path, ctx.root) if spec.default_path else None
            if spec.default_path and ctx.root is None:
                return None, (f"skipped {self.name}: {self.benchmark} reads {spec.default_path} under the data root; "
                              "give --data-root DIR or set SAFETYPATCH_DATA")
        if local is not None and not path_exists(local):
            return None, f"skipped {self.name}: {local} not found"
        return local, None

    def read(self, local: Path | None) -> list[Record]:
        assert self.benchmark is not None
        if not self.benchmark.startswith("file:"):
            return load_benchmark(self.benchmark, path=local)
        recs = read_records(local, prompt_field=self.prompt_field, response_field=None)  # type: ignore[arg-type]
        for i, r in enumerate(recs):
            r.meta = {**r.meta, "id": str(r.meta.get("id", i)), "category": str(r.meta.get("category", "")),
                      "label": self.file_label()}
        return recs

    def load(self, ctx: LoadContext) -> Prepared | None:
        local, skipped = self.local_file(ctx)
        if skipped is not None:
            ctx.notes.append(skipped)
            return None
        records = select(self.read(local), self, ctx.limit, self.stratum)
        return Prepared(self, records, str(local) if local else str(self.benchmark))
