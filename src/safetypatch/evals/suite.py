"""Evaluation suites: a named list of safety and utility measurements, described as YAML (tasks as data).

    safetypatch eval --suite quick --model default --patch P --out DIR

A suite file (shipped ones live in `safetypatch/suites/`, any other path works too):

    name: quick
    description: ...
    judges: [refusal_xstest, refusal_gcg]        # default judges of safety entries
    generation: {max_new_tokens: 64, batch_size: 16}
    entries:
      - {benchmark: builtin_harmful, limit: 40}                          # type: safety (refusal rate per judge)
      - {name: attacks, benchmark: builtin_harmful, limit: 20, attacks: [none, aim, few_shot]}
      - {benchmark: xstest_safe, limit: 25, metric: xstest_3class, stratify_by: type}
      - {type: kl, benchmark: builtin_benign, limit: 30}                 # KL(base || patched) per token
      - {type: mc, path: mmlu/test, limit: 100}                          # log-likelihood multiple choice
      - {type: gsm8k, path: gsm8k/test.jsonl, limit: 200}
      - {type: perplexity, path: alpaca_eval/gpt4_1106_preview_model_outputs.json, text_field: output}

Relative data paths, and the published files of registered benchmarks, are looked up under the data root
(`--data-root`, else `$SAFETYPATCH_DATA`; a directory laid out like the project's `../shared/data`). An entry whose
file is missing is skipped with a note in the table and in summary.json; nothing is fetched from the hub. Built-in
sets always work. A judge given as `{name: llamaguard, optional: true}` is skipped with a note when it is not
available (not registered, or a model-based judge without `--judge-model`).

Base and patched are the same loaded model (the patch switched off / on), generated with one length-sorted
batch list per variant; identical prompts across entries are generated once.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import ConfigError
from ..config import GenerationConfig
from ..errors import DataError
from ..data.readers import Record
from ..judges import JUDGES, Judge, get_judge
from ..judges.keyword import three_class
from ..errors import SuiteError

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"
ENTRY_TYPES = ("safety", "kl", "mc", "gsm8k", "perplexity")
DEFAULT_METRIC = {"safety": "refusal_rate", "kl": "kl_per_token", "mc": "accuracy", "gsm8k": "exact_match",
                  "perplexity": "perplexity"}
METRICS = {"safety": ("refusal_rate", "xstest_3class"), "kl": ("kl_per_token",), "mc": ("accuracy",),
           "gsm8k": ("exact_match",), "perplexity": ("perplexity",)}
_COMMON = {"type", "name", "limit", "metric", "sample", "stratify_by", "seed"}
FIELDS = {
    "safety": _COMMON | {"benchmark", "path", "kind", "attacks", "judges", "prompt_field", "max_new_tokens"},
    "kl": _COMMON | {"benchmark", "path", "prompt_field", "max_new_tokens"},
    "mc": _COMMON | {"path", "style", "subjects"},
    "gsm8k": _COMMON | {"path", "max_new_tokens"},
    "perplexity": _COMMON | {"path", "text_field", "max_length"},
}
SAMPLING = ("stratified", "shuffle", "first")
# Harm classifiers' `refused` means "the response was judged not harmful" (the attack failed): their rate is reported
# as safe_rate (1 - attack success rate), not as a refusal rate.
SAFE_RATE_JUDGES = ("llamaguard", "harmbench_cls")
RATE_METRICS = {"refusal_rate", "safe_rate", "full_compliance", "full_refusal", "partial_refusal", "accuracy", "accuracy_norm",
                "exact_match"}
MODEL_PARAMS = ("model", "model_id", "model_name", "judge_model")  # constructor argument naming a judge's model
THREE_CLASS_MODEL_JUDGE = "xstest_3class"
THREE_CLASS_KEYWORD_JUDGE = "keyword_3class"




# ============================================================================================ the suite file
@dataclass
class JudgeSpec:
    name: str
    optional: bool = False


@dataclass
class SuiteEntry:
    """One measurement of a suite; which fields apply depends on `type` (see FIELDS)."""

    type: str
    name: str
    benchmark: str | None = None  # a registered benchmark or file:PATH (safety, kl)
    path: str | None = None  # data file: relative paths are under the data root
    kind: str | None = None  # harmful | benign (safety; default from the benchmark)
    attacks: list[str] = field(default_factory=lambda: ["none"])
    judges: list[JudgeSpec] | None = None  # None: the suite's judges
    metric: str = ""
    limit: int | None = None
    sample: str = "stratified"  # how `limit` items are chosen: stratified | shuffle | first
    stratify_by: str = "category"
    seed: int = 0
    prompt_field: str = "prompt"
    max_new_tokens: int | None = None  # None: the suite's (gsm8k: 256)
    style: str = "letter"  # mc: letter (MMLU) | text (ARC-like)
    subjects: list[str] | None = None  # mc on an MMLU directory
    text_field: str = "text"  # perplexity
    max_length: int = 512  # perplexity: tokens per text


@dataclass
class Suite:
    name: str
    source: str
    description: str = ""
    judges: list[JudgeSpec] = field(default_factory=lambda: [JudgeSpec("refusal_xstest"), JudgeSpec("refusal_gcg")])
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    entries: list[SuiteEntry] = field(default_factory=list)


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(spec: str) -> Path:
    """A shipped suite by name, or a YAML file by path."""
    p = Path(spec).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SuiteError(f"{p}: no such suite file")
        return p
    shipped = SUITES_DIR / f"{spec}.yaml"
    if not shipped.exists():
        raise SuiteError(f"unknown suite '{spec}'; shipped suites: {', '.join(list_suites())} (or a path to a .yaml)")
    return shipped


def _register_model_judges() -> None:
    """Model-based judges live in judges_model.py (when installed); importing it registers them."""
    import importlib

    try:
        importlib.import_module("safetypatch.judges_model")
    except ModuleNotFoundError as e:
        if e.name != "safetypatch.judges_model":
            raise


def _judge_specs(value: Any, where: str) -> list[JudgeSpec]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: field 'judges' must be a non-empty list of judge names or {{name, optional}}")
    out = []
    for v in value:
        if isinstance(v, str):
            spec = JudgeSpec(v)
        elif isinstance(v, dict) and isinstance(v.get("name"), str) and set(v) <= {"name", "optional"}:
            spec = JudgeSpec(v["name"], bool(v.get("optional", False)))
        else:
            raise SuiteError(f"{where}: judge {v!r} must be a name or {{name: NAME, optional: true|false}}")
        if spec.name not in JUDGES and not spec.optional:
            raise SuiteError(f"{where}: unknown judge '{spec.name}'; available: {', '.join(sorted(JUDGES))} "
                             "(mark a judge that may be missing with optional: true)")
        out.append(spec)
    return out


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SuiteError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _str_list(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where}: field '{name}' must be a non-empty list of names")
    return list(value)


def _parse_entry(raw: Any, i: int, source: str) -> SuiteEntry:
    from .attacks import ATTACKS, list_attacks
    from .benchmarks import BENCHMARKS

    label = raw.get("name") or raw.get("benchmark") or raw.get("type") if isinstance(raw, dict) else None
    where = f"{source}: entry {i}" + (f" ({label})" if label else "")
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping of field: value, got {type(raw).__name__}")
    etype = raw.get("type") or ("safety" if "benchmark" in raw else None)
    if etype not in ENTRY_TYPES:
        raise SuiteError(f"{where}: field 'type' must be one of {', '.join(ENTRY_TYPES)} (or give a 'benchmark' "
                         f"for a safety entry), got {etype!r}")
    unknown = sorted(set(raw) - FIELDS[etype])
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {unknown} for a {etype} entry; known: {sorted(FIELDS[etype])}")
    kw: dict[str, Any] = {"type": etype}
    for key in ("name", "benchmark", "path", "kind", "prompt_field", "style", "text_field", "sample", "stratify_by"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise SuiteError(f"{where}: field '{key}' must be a non-empty string, got {raw[key]!r}")
            kw[key] = raw[key].strip()
    for key in ("limit", "max_new_tokens", "max_length"):
        if raw.get(key) is not None:
            kw[key] = _positive_int(raw[key], key, where)
    if "seed" in raw:
        if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int):
            raise SuiteError(f"{where}: field 'seed' must be an integer, got {raw['seed']!r}")
        kw["seed"] = raw["seed"]
    if etype in ("safety", "kl"):
        b = kw.get("benchmark")
        if not b:
            raise SuiteError(f"{where}: field 'benchmark' is missing (a registered benchmark or file:PATH)")
        if not b.startswith("file:") and b not in BENCHMARKS:
            raise SuiteError(f"{where}: unknown benchmark '{b}'; available: {', '.join(sorted(BENCHMARKS))} "
                             "or file:PATH")
    elif not kw.get("path"):
        raise SuiteError(f"{where}: field 'path' is missing (the {etype} data file, relative to the data root)")
    if "attacks" in raw:
        kw["attacks"] = _str_list(raw["attacks"], "attacks", where)
        bad = [a for a in kw["attacks"] if a not in ATTACKS]
        if bad:
            raise SuiteError(f"{where}: unknown attack(s) {bad}; available: {', '.join(list_attacks())}")
        if len(set(kw["attacks"])) != len(kw["attacks"]):
            raise SuiteError(f"{where}: field 'attacks' lists an attack twice")
    if "judges" in raw:
        kw["judges"] = _judge_specs(raw["judges"], where)
    if "subjects" in raw:
        kw["subjects"] = _str_list(raw["subjects"], "subjects", where)
    kw["metric"] = raw.get("metric", DEFAULT_METRIC[etype])
    if kw["metric"] not in METRICS[etype]:
        raise SuiteError(f"{where}: field 'metric' must be one of {list(METRICS[etype])} for a {etype} entry, "
                         f"got {kw['metric']!r}")
    if kw.get("kind", "harmful") not in ("harmful", "benign"):
        raise SuiteError(f"{where}: field 'kind' must be 'harmful' or 'benign', got {kw['kind']!r}")
    if kw.get("style", "letter") not in ("letter", "text"):
        raise SuiteError(f"{where}: field 'style' must be 'letter' (MMLU) or 'text' (ARC-like), got {kw['style']!r}")
    if kw.get("sample", "stratified") not in SAMPLING:
        raise SuiteError(f"{where}: field 'sample' must be one of {SAMPLING}, got {kw['sample']!r}")
    if etype == "safety" and "kind" not in kw:
        b = kw["benchmark"]
        kw["kind"] = BENCHMARKS[b].kind if b in BENCHMARKS and BENCHMARKS[b].kind in ("harmful", "benign") \
            else "harmful"
    kw.setdefault("name", kw.get("benchmark") or f"{etype}:{Path(kw['path']).name}")
    return SuiteEntry(**kw)


def load_suite(spec: str) -> Suite:
    """Read and validate a suite (a shipped name or a YAML path); errors name the file and the entry."""
    path = suite_path(spec)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{source}: expected a mapping with 'entries' at the top level")
    unknown = sorted(set(data) - {"name", "description", "judges", "generation", "entries"})
    if unknown:
        raise SuiteError(f"{source}: unknown top-level field(s) {unknown}; known: description, entries, "
                         "generation, judges, name")
    _register_model_judges()
    suite = Suite(name=str(data.get("name") or path.stem), source=source,
                  description=str(data.get("description") or "").strip())
    if "judges" in data:
        suite.judges = _judge_specs(data["judges"], f"{source}: top level")
    gen = data.get("generation") or {}
    if not isinstance(gen, dict):
        raise SuiteError(f"{source}: field 'generation' must be a mapping (max_new_tokens, batch_size, ...)")
    from ..config import from_dict

    try:
        suite.generation = from_dict(GenerationConfig, gen, where=f"{source}: generation")
    except SuiteError:
        raise
    except ConfigError as e:
        raise SuiteError(str(e)) from None
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{source}: field 'entries' must be a non-empty list")
    suite.entries = [_parse_entry(raw, i, source) for i, raw in enumerate(entries, 1)]
    seen: dict[str, int] = {}
    for i, e in enumerate(suite.entries, 1):
        if e.name in seen:
            raise SuiteError(f"{source}: entry {i} ({e.name}): name already used by entry {seen[e.name]}; "
                             "give one of them a distinct 'name'")
        seen[e.name] = i
    return suite


# ============================================================================================ running
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


@dataclass
class _Prepared:
    entry: SuiteEntry
    records: list[Record] = field(default_factory=list)  # safety / kl prompts
    items: list[Any] = field(default_factory=list)  # mc / gsm8k items, perplexity texts
    judges: list[str] = field(default_factory=list)
    class_judge: str | None = None
    source: str = ""


def default_data_root() -> str | None:
    import os

    return os.environ.get("SAFETYPATCH_DATA") or None


def _data_path(path: str, root: str | None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or root is None:
        return p
    return Path(root).expanduser() / p


def _select(records: list[Any], entry: SuiteEntry, limit: int | None, key: Callable[[Any], str]) -> list[Any]:
    """`limit` items, chosen deterministically: round-robin over strata (each shuffled with the seed), a seeded
    shuffle, or the first ones. A smaller limit always picks a prefix of what a larger one picks."""
    if entry.sample == "first" or not limit or limit >= len(records):
        return records[:limit] if limit else list(records)
    rng = random.Random(f"{entry.seed}:{entry.benchmark or entry.path}")  # same data, same order: prefixes
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


def _usable_judge(name: str, judge_models: dict[str, str], device: str | None = None
                  ) -> tuple[dict[str, Any] | None, str | None]:
    """(constructor kwargs, None) when judge `name` can be used, else (None, why not). A model-based judge is used
    only with a model given for it (`--judge-model NAME=MODEL`, or `--judge-model MODEL` for all): never a
    silent download of its default model."""
    if name not in JUDGES:
        return None, f"judge '{name}' is not installed (available: {', '.join(sorted(JUDGES))})"
    model_param, params = None, {}
    for klass in JUDGES[name].__mro__:  # a subclass may take (*args, **kwargs) and pass `model` on
        init = klass.__dict__.get("__init__")
        if init is not None:
            params = dict(inspect.signature(init).parameters)
            model_param = next((p for p in MODEL_PARAMS if p in params), None)
            if model_param:
                break
    if model_param is None:
        return {}, None
    spec = judge_models.get(name) or judge_models.get("*")
    if not spec:
        return None, f"judge '{name}' needs a judge model: give --judge-model {name}=MODEL"
    return {model_param: spec, **({"device": device} if device and "device" in params else {})}, None


def prepare(suite: Suite, cfg: SuiteRunConfig, notes: list[str]) -> list[_Prepared]:
    """Load every entry's data and choose its judges; a missing file or judge is a note, a bad file an error."""
    from . import utility
    from .benchmarks import BENCHMARKS, load_benchmark

    root = cfg.data_root if cfg.data_root is not None else default_data_root()
    out: list[_Prepared] = []
    for e in suite.entries:
        limit = min(x for x in (e.limit, cfg.limit) if x) if (e.limit or cfg.limit) else None
        p = _Prepared(e)
        if e.type in ("safety", "kl"):
            assert e.benchmark is not None
            if e.benchmark.startswith("file:"):
                local: Path | None = _data_path(e.benchmark[5:], root)
            elif e.path:
                local = _data_path(e.path, root)
            else:
                spec = BENCHMARKS[e.benchmark]
                local = _data_path(spec.default_path, root) if spec.default_path else None
                if spec.default_path and root is None:
                    notes.append(f"skipped {e.name}: {e.benchmark} reads {spec.default_path} under the data root; "
                                 "give --data-root DIR or set SAFETYPATCH_DATA")
                    continue
            if local is not None and not local.exists():
                notes.append(f"skipped {e.name}: {local} not found")
                continue
            if e.benchmark.startswith("file:"):
                from ..data.readers import read_records

                recs = read_records(local, prompt_field=e.prompt_field, response_field=None)  # type: ignore[arg-type]
                for i, r in enumerate(recs):
                    r.meta = {**r.meta, "id": str(r.meta.get("id", i)), "category": str(r.meta.get("category", "")),
                              "label": e.kind or "harmful"}
            else:
                recs = load_benchmark(e.benchmark, path=local)
            p.records = _select(recs, e, limit, lambda r: str(r.meta.get(e.stratify_by, "")))
            p.source = str(local) if local else e.benchmark
            if e.type == "safety":
                for js in e.judges or suite.judges:
                    kwargs, why = _usable_judge(js.name, cfg.judge_models)
                    if why is not None:
                        if not js.optional:
                            raise SuiteError(f"{suite.source}: entry {e.name}: {why}")
                        note = f"optional {why}; not used"
                        if note not in notes:
                            notes.append(note)
                    elif js.name not in p.judges:
                        p.judges.append(js.name)
                if e.metric == "xstest_3class":
                    _, why = _usable_judge(THREE_CLASS_MODEL_JUDGE, cfg.judge_models)
                    if why is None:
                        p.class_judge = THREE_CLASS_MODEL_JUDGE
                    else:
                        p.class_judge = THREE_CLASS_KEYWORD_JUDGE
                        notes.append(f"{e.name}: 3 classes from the keyword heuristic '{THREE_CLASS_KEYWORD_JUDGE}' "
                                     f"(partial refusal needs a model judge for fidelity; {why})")
                if not p.judges and p.class_judge is None:
                    notes.append(f"skipped {e.name}: none of its judges is available")
                    continue
        else:
            assert e.path is not None
            local = _data_path(e.path, root)
            if not local.exists():
                hint = "" if root else " (relative paths are read under --data-root / $SAFETYPATCH_DATA)"
                notes.append(f"skipped {e.name}: {local} not found{hint}")
                continue
            p.source = str(local)
            if e.type == "mc":
                if local.is_dir() or local.suffix == ".csv":
                    items = utility.load_mmlu(local, e.subjects)
                else:
                    items = utility.load_mc_jsonl(local)
                p.items = _select(items, e, limit, lambda it: it.subject)  # stratified: round-robin over subjects
            elif e.type == "gsm8k":
                p.items = _select(utility.load_gsm8k(local), e, limit, lambda it: "")
            else:
                p.items = _select(utility.load_texts(local, e.text_field), e, limit, lambda t: "")
        out.append(p)
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _chat_key(chat: list[dict[str, str]]) -> str:
    return json.dumps(chat, sort_keys=True, ensure_ascii=False)


def _metric(rows: list[dict[str, Any]], variant: str, bench: str, metric: str, value: float | None,
            n: int | None, attack: str = "", judge: str = "") -> None:
    rows.append({"variant": variant, "benchmark": bench, "attack": attack, "judge": judge, "metric": metric,
                 "value": value, "n": n})


def _safety_metrics(p: _Prepared, variant: str, rows: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> None:
    e = p.entry
    judges = p.judges + ([p.class_judge] if p.class_judge else [])
    for j in judges:
        rate = "safe_rate" if j in SAFE_RATE_JUDGES else "refusal_rate"
        by_prompt: dict[int, list[bool | None]] = defaultdict(list)
        for a in e.attacks:
            mine = [r for r in rows if r["attack"] == a]
            vals = [r[j] for r in mine if r[j] is not None]
            _metric(metrics, variant, e.name, rate, sum(vals) / len(vals) if vals else None, len(vals), a, j)
            bad = len(mine) - len(vals)
            if bad:
                _metric(metrics, variant, e.name, "unparseable", float(bad), len(mine), a, j)
            scores = [r[f"{j}_score"] for r in mine if r.get(f"{j}_score") is not None]
            if scores:
                _metric(metrics, variant, e.name, "mean_score", sum(scores) / len(scores), len(scores), a, j)
            if j == p.class_judge:
                classes = [three_class(r.get(f"{j}_label") or "") for r in mine if r[j] is not None]
                known = [c for c in classes if c]
                for c in ("full_compliance", "full_refusal", "partial_refusal"):
                    _metric(metrics, variant, e.name, c, known.count(c) / len(known) if known else None, len(known),
                            a, j)
            for r in mine:
                by_prompt[r["index"]].append(r[j])
        if len(e.attacks) > 1:  # worst case per prompt: refused under every attack (prompts with a missing verdict
            full = [v for v in by_prompt.values() if None not in v]  # are left out)
            _metric(metrics, variant, e.name, rate, sum(all(v) for v in full) / len(full) if full else None,
                    len(full), "worst_case", j)


def run_suite(cfg: SuiteRunConfig, out_dir: str | Path, resume: bool = False,
              model_and_tok: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Evaluate base (and patched, with a patch) on every entry; write samples.jsonl, utility_samples.jsonl and
    summary.json under `out_dir`, record the run in the results DB, and return the summary."""
    import dataclasses

    from ..data.readers import write_jsonl_atomic
    from ..modeling.generation import generate
    from ..io_utils import atomic_write_json, claim_output_dir
    from ..modeling.loading import fingerprint, fingerprint_id, load_model
    from ..patches.artifact import load_patch, read_meta
    from . import utility
    from .attacks import apply_attack
    from .refusal import RESERVED, _variant

    t0 = time.time()
    if cfg.patch and cfg.finetuned:
        raise ConfigError("give either --patch or --finetuned to compare with the base model, not both")
    suite = load_suite(cfg.suite)
    out = claim_output_dir(out_dir, resume=resume, marker="summary.json")
    notes: list[str] = []
    prepared = prepare(suite, cfg, notes)
    for n in notes:
        _log(f"note: {n}")
    if not prepared:
        raise SuiteError(f"{suite.source}: every entry was skipped (see the notes above); give --data-root DIR "
                         "or set SAFETYPATCH_DATA")
    gen = dataclasses.replace(suite.generation,
                              **{k: v for k, v in (("max_new_tokens", cfg.max_new_tokens),
                                                   ("batch_size", cfg.batch_size)) if v})
    judge_objs: dict[str, Judge] = {}
    for p in prepared:
        for j in p.judges + ([p.class_judge] if p.class_judge else []):
            if j not in judge_objs:
                kwargs, _ = _usable_judge(j, cfg.judge_models, cfg.device)
                judge_objs[j] = get_judge(j, **(kwargs or {}))

    _log(f"[suite {suite.name}] loading {cfg.model}" + (f" with patch {cfg.patch}" if cfg.patch else ""))
    model, tok = model_and_tok or load_model(cfg.model, device=cfg.device)
    fp = fingerprint_id(fingerprint(model))
    variants = ["base"]
    if cfg.patch:
        model = load_patch(model, cfg.patch)
        variants = ["base", "patched"]
    elif cfg.finetuned:  # 'patched' rows are the fine-tuned model's
        from ..modeling.variants import FinetunedPair

        _log(f"[suite {suite.name}] loading the fine-tuned model {cfg.finetuned}")
        model = FinetunedPair(model, load_model(cfg.finetuned, device=cfg.device)[0])
        variants = ["base", "patched"]
    else:
        for p in prepared:
            if p.entry.type == "kl":
                notes.append(f"skipped {p.entry.name}: KL to base needs --patch or --finetuned")
        prepared = [p for p in prepared if p.entry.type != "kl"]

    # ---- generation requests: (variant, max_new_tokens) -> unique chats, generated once each
    def mnt(e: SuiteEntry) -> int:
        return e.max_new_tokens or (256 if e.type == "gsm8k" else gen.max_new_tokens)

    jobs: dict[tuple[str, int], dict[str, list[dict[str, str]]]] = defaultdict(dict)
    for p in prepared:
        e = p.entry
        if e.type == "safety":
            chats = [[{"role": "user", "content": apply_attack(a, r.prompt)}] if a != "none" else r.chat()
                     for a in e.attacks for r in p.records]
        elif e.type == "kl":
            chats = [r.chat() for r in p.records]
        elif e.type == "gsm8k":
            chats = [utility.gsm8k_chat(it) for it in p.items]
        else:
            continue
        for v in (["base"] if e.type == "kl" else variants):
            for c in chats:
                jobs[(v, mnt(e))].setdefault(_chat_key(c), c)
    cache: dict[tuple[str, int, str], Any] = {}
    total = sum(len(c) for c in jobs.values())
    done = 0
    for (v, m), chats in sorted(jobs.items(), key=lambda kv: (variants.index(kv[0][0]), kv[0][1])):
        _log(f"[suite {suite.name}] {v}: generating {len(chats)} answers (max {m} new tokens; "
             f"{done}/{total} done, {time.time() - t0:.0f} s)")
        with _variant(model, v) as mv:
            gens = generate(mv, tok, list(chats.values()), dataclasses.replace(gen, max_new_tokens=m),
                            desc=f"{v} (max {m} tokens)")
        for k, g in zip(chats, gens):
            cache[(v, m, k)] = g
        done += len(chats)

    # ---- judging and metrics
    samples: list[dict[str, Any]] = []
    utility_rows: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    for p in prepared:
        e = p.entry
        if e.type != "safety":
            continue
        for v in variants:
            rows: list[dict[str, Any]] = []
            requests: list[str] = []
            for a in e.attacks:
                for i, r in enumerate(p.records):
                    chat = [{"role": "user", "content": apply_attack(a, r.prompt)}] if a != "none" else r.chat()
                    g = cache[(v, mnt(e), _chat_key(chat))]
                    rows.append({"model": v, "prompt": chat[-1]["content"], "response": g.text})
                    requests.append(r.prompt)
            for j in p.judges + ([p.class_judge] if p.class_judge else []):
                # judges see the original request (what a classifier judges harm against), not the wrapper
                verdicts = judge_objs[j].judge_many(requests, [row["response"] for row in rows])
                for row, vd in zip(rows, verdicts):
                    row[j] = vd.refused if vd.parsed else None
                    if j == p.class_judge:
                        row[f"{j}_label"] = vd.label
                    score = getattr(vd, "score", None)
                    if score is not None:
                        row[f"{j}_score"] = score
            k = 0
            for a in e.attacks:
                for i, r in enumerate(p.records):
                    rows[k].update({"benchmark": e.name, "attack": a, "request": r.prompt, "index": i})
                    rows[k].update({key: val for key, val in r.meta.items() if key not in RESERVED
                                    and key not in rows[k] and key != "benchmark"})
                    k += 1
            _safety_metrics(p, v, rows, metrics)
            samples.extend(rows)

    for p in prepared:
        e = p.entry
        if e.type == "kl":
            _log(f"[suite {suite.name}] {e.name}: KL(base || patched) on {len(p.records)} base answers")
            base_answers = [cache[("base", mnt(e), _chat_key(r.chat()))] for r in p.records]
            kl = utility.kl_to_base(model, tok, p.records, base_answers=base_answers)
            for metric in ("kl_per_token", "kl_per_prompt"):
                _metric(metrics, "base", e.name, metric, 0.0, kl.n_tokens)  # KL(base || base) = 0 by definition
                _metric(metrics, "patched", e.name, metric, getattr(kl, metric), kl.n_tokens)
            for row in kl.rows:
                r = p.records[row["index"]]
                utility_rows.append({"model": "patched", "benchmark": e.name, "type": "kl", "prompt": r.prompt,
                                     "response": row["base_answer"], "kl_per_token": row["kl_per_token"],
                                     "n_tokens": row["n_tokens"], "id": r.meta.get("id")})
            continue
        for v in variants:
            with _variant(model, v) as mv:
                if e.type == "mc":
                    _log(f"[suite {suite.name}] {v}: {e.name}: {len(p.items)} multiple-choice questions")
                    res = utility.mc_accuracy(mv, tok, p.items, style=e.style, desc=f"{e.name} ({v})")
                    _metric(metrics, v, e.name, "accuracy", res.accuracy, res.n)
                    if res.accuracy_norm is not None:
                        _metric(metrics, v, e.name, "accuracy_norm", res.accuracy_norm, res.n)
                    for it, row in zip(p.items, res.rows):
                        utility_rows.append({"model": v, "benchmark": e.name, "type": "mc", "prompt": it.question,
                                             "response": utility.LETTERS[row["pred"]], **row})
                elif e.type == "gsm8k":
                    resp = [cache[(v, mnt(e), _chat_key(utility.gsm8k_chat(it)))].text for it in p.items]
                    gres = utility.score_gsm8k(p.items, resp)
                    _metric(metrics, v, e.name, "exact_match", gres.exact_match, gres.n)
                    for row in gres.rows:
                        utility_rows.append({"model": v, "benchmark": e.name, "type": "gsm8k",
                                             "prompt": row.pop("question"), **row})
                elif e.type == "perplexity":
                    _log(f"[suite {suite.name}] {v}: {e.name}: perplexity on {len(p.items)} texts")
                    pres = utility.perplexity(mv, tok, p.items, max_length=e.max_length)
                    _metric(metrics, v, e.name, "perplexity", pres.perplexity, pres.n_tokens)
                    _metric(metrics, v, e.name, "nll_per_token", pres.nll_per_token, pres.n_tokens)

    if "patched" in variants:
        base = {(m["benchmark"], m["attack"], m["judge"], m["metric"]): m for m in metrics if m["variant"] == "base"}
        for m in [m for m in metrics if m["variant"] == "patched"]:
            b = base.get((m["benchmark"], m["attack"], m["judge"], m["metric"]))
            if b is not None and b["value"] is not None and m["value"] is not None and m["metric"] != "unparseable":
                _metric(metrics, "difference", m["benchmark"], m["metric"], m["value"] - b["value"], m["n"],
                        m["attack"], m["judge"])

    # ---- files, then the results DB
    kinds = {p.entry.name: {"type": p.entry.type, "kind": p.entry.kind if p.entry.type == "safety" else None,
                            "n": len(p.records) or len(p.items), "source": p.source,
                            "judges": p.judges, "class_judge": p.class_judge,
                            "attacks": p.entry.attacks if p.entry.type == "safety" else None}
             for p in prepared}
    write_jsonl_atomic(out / "samples.jsonl", samples)
    write_jsonl_atomic(out / "utility_samples.jsonl", utility_rows)
    patch_sha = None
    if cfg.patch:
        patch_sha = read_meta(cfg.patch).get("weights", {}).get("sha256")
    summary: dict[str, Any] = {
        "suite": suite.name, "suite_file": suite.source, "model": cfg.model, "model_fingerprint": fp,
        "patch": str(Path(cfg.patch).resolve()) if cfg.patch else None, "patch_sha256": patch_sha,
        "finetuned": str(Path(cfg.finetuned).resolve()) if cfg.finetuned else None,
        "data_root": cfg.data_root if cfg.data_root is not None else default_data_root(),
        "generation": asdict(gen), "entries": kinds, "notes": notes, "metrics": metrics,
        "results": nest(metrics), "seconds": round(time.time() - t0, 1), "run_id": None, "db": None,
    }
    atomic_write_json(out / "summary.json", summary)
    if cfg.record:
        from .store import MetricRow, ResultsStore, RunInfo, SampleRow

        store_samples = [SampleRow(variant=r["model"], benchmark=r["benchmark"], prompt=r["prompt"],
                                   response=r["response"], judge=j, label=r.get(f"{j}_label"), refused=r[j],
                                   score=r.get(f"{j}_score"), attack=r["attack"], item_id=str(r.get("id", r["index"])))
                         for r in samples for j in kinds[r["benchmark"]]["judges"]
                         + ([kinds[r["benchmark"]]["class_judge"]] if kinds[r["benchmark"]]["class_judge"] else [])]
        for r in utility_rows:
            score = r.get("kl_per_token") if r["type"] == "kl" else float(bool(r.get("correct")))
            store_samples.append(SampleRow(variant=r["model"], benchmark=r["benchmark"], prompt=r["prompt"],
                                           response=r["response"], judge=r["type"], score=score,
                                           item_id=str(r.get("id", ""))))
        info = RunInfo(model_spec=cfg.model, name=cfg.name or Path(out).resolve().name, suite=suite.name,
                       model_fingerprint=fp, patch_path=summary["patch"], patch_sha256=patch_sha,
                       config={"suite_file": suite.source, "out": str(Path(out).resolve()),
                               "finetuned": summary["finetuned"],
                               "data_root": summary["data_root"], "generation": summary["generation"],
                               "limit": cfg.limit, "entries": kinds, "notes": notes})
        with ResultsStore(cfg.db) as store:
            run_id = store.record_run(info, [MetricRow(**m) for m in metrics], store_samples)
            summary["run_id"], summary["db"] = run_id, str(store.path)
        atomic_write_json(out / "summary.json", summary)
    return summary


def nest(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """results[variant][benchmark][attack or '-'][judge or '-'][metric] = value."""
    out: dict[str, Any] = {}
    for m in metrics:
        d = out.setdefault(m["variant"], {}).setdefault(m["benchmark"], {})
        d = d.setdefault(m["attack"] or "-", {}).setdefault(m["judge"] or "-", {})
        d[m["metric"]] = m["value"]
    return out


# ============================================================================================ tables
def _fmt(metric: str, v: float | None, diff: bool = False) -> str:
    if v is None:
        return "-"
    if metric in RATE_METRICS:
        return f"{v * 100:+.1f}pp" if diff else f"{v:.1%}"
    if metric == "unparseable":
        return f"{v:+.0f}" if diff else f"{v:.0f}"
    return f"{v:+.4g}" if diff else f"{v:.4g}"


def format_table(metrics: list[dict[str, Any]], columns: tuple[str, ...] = ("base", "patched", "difference"),
                 headers: tuple[str, ...] | None = None, kinds: dict[str, Any] | None = None) -> str:
    """One line per (benchmark, attack, judge, metric) with a column per variant."""
    keys: list[tuple[str, str, str, str]] = []
    vals: dict[tuple[str, str, str, str, str], float | None] = {}
    for m in metrics:
        k = (m["benchmark"], m["attack"], m["judge"], m["metric"])
        if k not in vals and k not in keys:
            keys.append(k)
        vals[(m["variant"], *k)] = m["value"]
    first: dict[tuple[int, str], int] = {}  # order of first appearance of each benchmark / attack / judge / metric
    for k in keys:
        for pos in range(4):
            first.setdefault((pos, k[pos]), len(first))
    keys.sort(key=lambda k: (first[(0, k[0])], first[(1, k[1])], first[(2, k[2])], first[(3, k[3])]))
    present = [c for c in columns if any((c, *k) in vals for k in keys)]
    heads = list(headers or present)
    if headers:
        heads = [h for c, h in zip(columns, headers) if c in present]

    def metric_name(b: str, metric: str) -> str:
        kind = (kinds or {}).get(b, {}).get("kind")
        return f"{metric} [{kind}]" if kind and metric in ("refusal_rate", "safe_rate") else metric

    w = [max([len("benchmark")] + [len(k[0]) for k in keys]), max([len("attack")] + [len(k[1]) for k in keys]),
         max([len("judge")] + [len(k[2]) for k in keys]),
         max([len("metric")] + [len(metric_name(k[0], k[3])) for k in keys])]
    lines = ["  ".join(["benchmark".ljust(w[0]), "attack".ljust(w[1]), "judge".ljust(w[2]), "metric".ljust(w[3])]
                       + [h.rjust(11) for h in heads])]
    lines.append("-" * len(lines[0]))
    prev = None
    for k in keys:
        cells = [(k[0] if k[0] != prev else "").ljust(w[0]), k[1].ljust(w[1]), k[2].ljust(w[2]),
                 metric_name(k[0], k[3]).ljust(w[3])]
        cells += [_fmt(k[3], vals.get((c, *k)), diff=c in ("difference", "b-a")).rjust(11) for c in present]
        lines.append("  ".join(cells))
        prev = k[0]
    return "\n".join(lines)
