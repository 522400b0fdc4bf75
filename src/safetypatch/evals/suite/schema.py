"""The suite file: a named list of safety and utility measurements, described as YAML (tasks as data).

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

Shipped suites live in `safetypatch/suites/`; any other path works too. Each entry is checked against its type's
fields (`ENTRY_TYPES`); errors name the file, the entry and the field.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ...config import GenerationConfig, from_dict
from ...data.paths import shipped_or_path
from ...data.text import read_yaml_mapping
from ...errors import ConfigError, SuiteError
from ...judges import JUDGES
from .entry import ENTRY_TYPES, JudgeSpec, SuiteEntry

SUITES_DIR = Path(__file__).resolve().parents[2] / "suites"
TOP_LEVEL = ("description", "entries", "generation", "judges", "name")


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
    return shipped_or_path(spec, SUITES_DIR, "suite", SuiteError)


# ---------------------------------------------------------------------------------------------- field values
def judge_specs(value: Any, name: str, where: str) -> list[JudgeSpec]:
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


def nonempty_str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SuiteError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
    return value.strip()


def positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SuiteError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    return value


def integer(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SuiteError(f"{where}: field '{name}' must be an integer, got {value!r}")
    return value


def names(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where}: field '{name}' must be a non-empty list of names")
    return list(value)


def attack_names(value: Any, name: str, where: str) -> list[str]:
    from ..attacks import ATTACKS, list_attacks

    out = names(value, name, where)
    bad = [a for a in out if a not in ATTACKS]
    if bad:
        raise SuiteError(f"{where}: unknown attack(s) {bad}; available: {', '.join(list_attacks())}")
    if len(set(out)) != len(out):
        raise SuiteError(f"{where}: field 'attacks' lists an attack twice")
    return out


# field metadata `parse` -> checker, in the order fields are checked (the source check comes after the numbers)
PARSERS: dict[str, Callable[[Any, str, str], Any]] = {"str": nonempty_str, "positive_int": positive_int,
                                                      "int": integer, "attacks": attack_names,
                                                      "judges": judge_specs, "names": names}
BEFORE_SOURCE = ("str", "positive_int", "int")


# ---------------------------------------------------------------------------------------------- entries
def entry_class(raw: dict[str, Any], where: str) -> type[SuiteEntry]:
    etype = raw.get("type") or ("safety" if "benchmark" in raw else None)
    if not isinstance(etype, str) or etype not in ENTRY_TYPES:
        raise SuiteError(f"{where}: field 'type' must be one of {', '.join(ENTRY_TYPES)} (or give a 'benchmark' "
                         f"for a safety entry), got {etype!r}")
    cls = ENTRY_TYPES[etype]
    known = {"type"} | {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(raw) - known))
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {unknown} for a {etype} entry; known: {sorted(known)}")
    return cls


def parse_fields(cls: type[SuiteEntry], raw: dict[str, Any], kinds: tuple[str, ...], where: str,
                 kw: dict[str, Any]) -> None:
    """Check the raw fields whose `parse` kind is in `kinds` (kind by kind) into kw; a positive integer may be null."""
    for kind in kinds:
        for f in fields(cls):
            if f.metadata.get("parse") == kind and f.name in raw:
                if kind == "positive_int" and raw[f.name] is None:
                    continue
                kw[f.name] = PARSERS[kind](raw[f.name], f.name, where)


def check_choices(cls: type[SuiteEntry], raw: dict[str, Any], kw: dict[str, Any], where: str) -> None:
    kw["metric"] = raw.get("metric", cls.metrics[0])
    if kw["metric"] not in cls.metrics:
        raise SuiteError(f"{where}: field 'metric' must be one of {list(cls.metrics)} for a {cls.type} entry, "
                         f"got {kw['metric']!r}")
    choice_fields: list[Field[Any]] = [f for f in fields(cls) if "choices" in f.metadata and f.name in kw]
    for f in choice_fields:
        if kw[f.name] not in f.metadata["choices"]:
            raise SuiteError(f"{where}: field '{f.name}' must be {f.metadata['expect']}, got {kw[f.name]!r}")


def parse_entry(raw: Any, i: int, source: str) -> SuiteEntry:
    """One entry of the suite file, checked against its type's fields."""
    label = raw.get("name") or raw.get("benchmark") or raw.get("type") if isinstance(raw, dict) else None
    where = f"{source}: entry {i}" + (f" ({label})" if label else "")
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping of field: value, got {type(raw).__name__}")
    cls = entry_class(raw, where)
    kw: dict[str, Any] = {}
    parse_fields(cls, raw, BEFORE_SOURCE, where, kw)
    cls.check_source(kw, where)
    parse_fields(cls, raw, tuple(k for k in PARSERS if k not in BEFORE_SOURCE), where, kw)
    check_choices(cls, raw, kw, where)
    cls.complete(kw)
    return cls(**kw)


# ---------------------------------------------------------------------------------------------- the file
def read_mapping(path: Path) -> dict[str, Any]:
    """The suite file's top-level mapping (UTF-8 with or without a BOM); errors name the file."""
    return read_yaml_mapping(path, SuiteError, TOP_LEVEL, "'entries'")


def generation_settings(value: Any, source: str) -> GenerationConfig:
    gen = value or {}
    if not isinstance(gen, dict) or not all(isinstance(k, str) for k in gen):
        raise SuiteError(f"{source}: field 'generation' must be a mapping (max_new_tokens, batch_size, ...)")
    try:
        return from_dict(GenerationConfig, gen, where=f"{source}: generation")
    except SuiteError:
        raise
    except ConfigError as e:
        raise SuiteError(str(e)) from None


def load_suite(spec: str) -> Suite:
    """Read and validate a suite (a shipped name or a YAML path); errors name the file and the entry."""
    path = suite_path(spec)
    source = str(path)
    data = read_mapping(path)
    suite = Suite(name=str(data.get("name") or path.stem), source=source,
                  description=str(data.get("description") or "").strip())
    if "judges" in data:
        suite.judges = judge_specs(data["judges"], "judges", f"{source}: top level")
    suite.generation = generation_settings(data.get("generation"), source)
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{source}: field 'entries' must be a non-empty list")
    suite.entries = [parse_entry(raw, i, source) for i, raw in enumerate(entries, 1)]
    seen: dict[str, int] = {}
    for i, e in enumerate(suite.entries, 1):
        if e.name in seen:
            raise SuiteError(f"{source}: entry {i} ({e.name}): name already used by entry {seen[e.name]}; "
                             "give one of them a distinct 'name'")
        seen[e.name] = i
    return suite
