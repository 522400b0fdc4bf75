"""Benchmark loaders: harmful and benign prompt sets in their published file formats, as `Record`s.

Each loader reads a local file in the benchmark's own layout (path given, or found under `$SAFETYPATCH_DATA`, a
directory laid out like the project's `../shared/data`) and otherwise its usual hub dataset id through
`datasets.load_dataset`. Every record's meta has `benchmark`, `id`, `category` and `label` ("harmful" / "benign").
A user's own file works the same way: `load_benchmark("file:/path/prompts.jsonl")`.

The registry is public: `BENCHMARKS` (name -> spec) and `register_benchmark(spec)`, a decorator on the loader; a new
benchmark is one decorated function (e.g. `_advbench` below).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError
from ..data.readers import Record
from ..data.text import open_text, read_text


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: str  # "harmful" | "benign" | "mixed"
    description: str
    hub_id: str | None
    default_path: str | None  # relative to $SAFETYPATCH_DATA


Loader = Callable[[Path | None], list[Record]]  # the local file (None: the hub copy) -> the prompts
BENCHMARKS: dict[str, BenchmarkSpec] = {}
BENCHMARK_LOADERS: dict[str, Loader] = {}


def register_benchmark(spec: BenchmarkSpec) -> Callable[[Loader], Loader]:
    """Decorator: register `spec` with its loader (a function of the local file, None for the hub copy, returning
    `Record`s whose meta has benchmark, id, category and label). A new benchmark is one decorated loader; cite
    the source (paper, hub id, file layout) in the spec's description."""
    def wrap(fn: Loader) -> Loader:
        BENCHMARKS[spec.name] = spec
        BENCHMARK_LOADERS[spec.name] = fn
        return fn
    return wrap


def list_benchmarks() -> list[BenchmarkSpec]:
    return [BENCHMARKS[n] for n in sorted(BENCHMARKS)]


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Record]:
    """The benchmark's prompts; `path` overrides where the file is read from."""
    if name.startswith("file:"):
        from ..data.readers import read_records

        records = read_records(name[len("file:"):], require_response=False)
        for i, r in enumerate(records):
            r.meta = {"benchmark": "file", "id": str(r.meta.get("id", i)), "category": str(r.meta.get("category", "")),
                      "label": str(r.meta.get("label", "harmful")), **r.meta}
        return records[:limit] if limit else records
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}'; available: {', '.join(sorted(BENCHMARKS))} or file:PATH")
    spec = BENCHMARKS[name]
    local = Path(path) if path else _default_local(spec)
    if local is not None and not local.exists():
        raise DataError(f"{local}: no such file for benchmark '{name}'")
    records = BENCHMARK_LOADERS[name](local)
    if not records:
        raise DataError(f"{local or spec.hub_id}: benchmark '{name}' has no prompts")
    return records[:limit] if limit else records


def _default_local(spec: BenchmarkSpec) -> Path | None:
    root = os.environ.get("SAFETYPATCH_DATA")
    if root and spec.default_path and (Path(root) / spec.default_path).exists():
        return Path(root) / spec.default_path
    return None


def _csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a benchmark's CSV (UTF-8, with or without a BOM); errors name the file and line."""
    with open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        try:
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({e}); an unclosed quote makes the "
                            "rest of the file one field: close it") from None
    for i, row in enumerate(rows, 2):
        for c in required:
            if row.get(c) is None:
                raise DataError(f"{path}:{i}: field '{c}' is empty")
    return rows


def _hub_rows(hub_id: str, split: str = "train", config: str | None = None) -> list[dict[str, str]]:
    from datasets import load_dataset

    try:
        return [dict(r) for r in load_dataset(hub_id, config, split=split)]
    except Exception as e:  # network, auth or not-found: say which dataset and how to work offline
        raise DataError(f"{hub_id}: could not load hub dataset ({type(e).__name__}: {e}); give the local file "
                        "(--path, or $SAFETYPATCH_DATA)") from None


def _rec(benchmark: str, prompt: str, idx: str, category: str, label: str, **meta: str) -> Record:
    if not prompt or not prompt.strip():
        raise DataError(f"{benchmark}: item {idx} has an empty prompt")
    return Record(prompt=prompt.strip(), meta={"benchmark": benchmark, "id": idx, "category": category,
                                                "label": label, **meta})


@register_benchmark(BenchmarkSpec(
    "advbench", "harmful", "AdvBench harmful_behaviors (Zou et al. 2023): goal,target",
    "walledai/AdvBench", "advbench/harmful_behaviors.csv"))
def _advbench(path: Path | None) -> list[Record]:
    if path is None:
        return [_rec("advbench", r["prompt"], str(i), "", "harmful") for i, r in enumerate(_hub_rows("walledai/AdvBench"))]
    return [_rec("advbench", r["goal"], str(i), "", "harmful") for i, r in enumerate(_csv_rows(path, ("goal",)))]


def _harmbench(path: Path | None, functional: str, name: str) -> list[Record]:
    if path is None:
        rows = _hub_rows("walledai/HarmBench", config=functional)
        return [_rec(name, (r.get("context", "") + "\n\n---\n\n" if r.get("context") else "") + r["prompt"], str(i),
                     r.get("category", ""), "harmful") for i, r in enumerate(rows)]
    rows = _csv_rows(path, ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"))
    out = []
    for r in rows:
        if r["FunctionalCategory"] != functional:
            continue
        # HarmBench's contextual behaviours put the context first, separated as in its own prompt templates
        prompt = f"{r['ContextString']}\n\n---\n\n{r['Behavior']}" if functional == "contextual" else r["Behavior"]
        out.append(_rec(name, prompt, r["BehaviorID"], r["SemanticCategory"], "harmful"))
    return out


@register_benchmark(BenchmarkSpec(
    "harmbench", "harmful", "HarmBench text behaviours, standard (Mazeika et al. 2024)",
    "walledai/HarmBench", "harmbench/harmbench_behaviors_text_val.csv"))
def _harmbench_standard(path: Path | None) -> list[Record]:
    return _harmbench(path, "standard", "harmbench")


@register_benchmark(BenchmarkSpec(
    "harmbench_contextual", "harmful", "HarmBench contextual behaviours (context + request)",
    "walledai/HarmBench", "harmbench/harmbench_behaviors_text_val.csv"))
def _harmbench_contextual(path: Path | None) -> list[Record]:
    return _harmbench(path, "contextual", "harmbench_contextual")


def _jbb(path: Path | None, split: str, name: str, label: str) -> list[Record]:
    if path is None:
        rows = _hub_rows("JailbreakBench/JBB-Behaviors", split=split, config="behaviors")
        return [_rec(name, r["Goal"], str(r.get("Index", i)), r.get("Category", ""), label) for i, r in enumerate(rows)]
    rows = _csv_rows(path, ("goal", "category"))
    return [_rec(name, r["goal"], r.get("index", str(i)), r["category"], label, behavior=r.get("behavior", ""))
            for i, r in enumerate(rows)]


@register_benchmark(BenchmarkSpec(
    "jbb_harmful", "harmful", "JailbreakBench JBB-Behaviors, harmful (Chao et al. 2024)",
    "JailbreakBench/JBB-Behaviors", "jbb/harmful-behaviors.csv"))
def _jbb_harmful(path: Path | None) -> list[Record]:
    return _jbb(path, "harmful", "jbb_harmful", "harmful")


@register_benchmark(BenchmarkSpec(
    "jbb_benign", "benign", "JailbreakBench JBB-Behaviors, benign twins",
    "JailbreakBench/JBB-Behaviors", "jbb/benign-behaviors.csv"))
def _jbb_benign(path: Path | None) -> list[Record]:
    return _jbb(path, "benign", "jbb_benign", "benign")


def _strongreject(path: Path | None, name: str, hub_file: str) -> list[Record]:
    if path is None:
        rows = _hub_rows("walledai/StrongREJECT")
        return [_rec(name, r["prompt"], str(i), r.get("category", ""), "harmful") for i, r in enumerate(rows)]
    rows = _csv_rows(path, ("category", "forbidden_prompt"))
    return [_rec(name, r["forbidden_prompt"], str(i), r["category"], "harmful", source=r.get("source", ""))
            for i, r in enumerate(rows)]


@register_benchmark(BenchmarkSpec(
    "strongreject", "harmful", "StrongREJECT (Souly et al. 2024): category,source,forbidden_prompt",
    "walledai/StrongREJECT", "strongreject/strongreject_dataset.csv"))
def _sr(path: Path | None) -> list[Record]:
    return _strongreject(path, "strongreject", "strongreject_dataset.csv")


@register_benchmark(BenchmarkSpec(
    "strongreject_small", "harmful", "StrongREJECT small subset", None,
    "strongreject/strongreject_small_dataset.csv"))
def _sr_small(path: Path | None) -> list[Record]:
    if path is None:
        raise DataError("strongreject_small: give --path to strongreject_small_dataset.csv (no hub copy is known)")
    return _strongreject(path, "strongreject_small", "strongreject_small_dataset.csv")


def _xstest(path: Path | None, want: str, name: str) -> list[Record]:
    if path is None:
        rows = [{**r, "id": str(i)} for i, r in enumerate(_hub_rows("walledai/XSTest", split="test"))]
    else:
        rows = _csv_rows(path, ("id", "prompt", "type", "label"))
    return [_rec(name, r["prompt"], str(r["id"]), r.get("focus", "") or r["type"],
                 "benign" if want == "safe" else "harmful", type=r["type"])
            for r in rows if r["label"] == want]


@register_benchmark(BenchmarkSpec(
    "xstest_safe", "benign", "XSTest safe prompts (Röttger et al. 2024), 10 safe types",
    "walledai/XSTest", "xstest/xstest_prompts.csv"))
def _xs_safe(path: Path | None) -> list[Record]:
    return _xstest(path, "safe", "xstest_safe")


@register_benchmark(BenchmarkSpec(
    "xstest_unsafe", "harmful", "XSTest unsafe contrast prompts", "walledai/XSTest",
    "xstest/xstest_prompts.csv"))
def _xs_unsafe(path: Path | None) -> list[Record]:
    return _xstest(path, "unsafe", "xstest_unsafe")


@register_benchmark(BenchmarkSpec(
    "malicious_instruct", "harmful", "MaliciousInstruct (Huang et al. 2023), one per line",
    "walledai/MaliciousInstruct", "malicious_instruct/malicious_instruct.txt"))
def _mi(path: Path | None) -> list[Record]:
    if path is None:
        return [_rec("malicious_instruct", r["prompt"], str(i), "", "harmful")
                for i, r in enumerate(_hub_rows("walledai/MaliciousInstruct"))]
    lines = [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
    return [_rec("malicious_instruct", p, str(i), "", "harmful") for i, p in enumerate(lines)]


def _builtin(set_name: str, label: str) -> Callable[[Path | None], list[Record]]:
    def load(_path: Path | None) -> list[Record]:
        from ..data.builtin import builtin_split

        return [_rec(f"builtin_{set_name}", r.prompt, str(r.meta.get("id", i)), str(r.meta.get("category", "")),
                     label, kind=str(r.meta.get("kind", ""))) for i, r in enumerate(builtin_split(set_name, "test"))]
    return load


register_benchmark(BenchmarkSpec(
    "builtin_harmful", "harmful", "safetypatch built-in harmful requests, test split", None, None))(
    _builtin("harmful", "harmful"))
register_benchmark(BenchmarkSpec(
    "builtin_benign", "benign", "safetypatch built-in benign requests, test split", None, None))(
    _builtin("benign", "benign"))
