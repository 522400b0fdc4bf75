"""Dataclass configs for every component, with YAML load/dump and validation that names the bad field.

The CLI builds its flags from these dataclasses (the TRL / HfArgumentParser habit): a YAML recipe maps 1:1 onto
the fields and flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import numbers
import os
import re
import sys
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C")


def safetypatch_home() -> Path:
    """Root of safetypatch's caches (models converted from GGUF, base-model answers, SVDs)."""
    return Path(os.environ.get("SAFETYPATCH_HOME", Path.home() / ".cache" / "safetypatch")).expanduser()


# ------------------------------------------------------------------------------------------- number ranges
# Every int / float field (and every element of a tuple[float, ...] / list[int] field) is checked by
# `check_numbers`: finite, an integer where the annotation says int, and within the bounds its metadata gives:
# "min" (>=), "gt" (>), "max" (<=), "lt" (<). Ints are capped at INT_MAX unless "max" says otherwise (a limit or a
# token count beyond it is a typo, and torch / tokenizers overflow on it). `from_dict` and the command line's
# `config_from_args` both call it (through `check_config`), and every config's `validate` starts with it.
INT_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # the largest seed numpy accepts
BOUNDS = (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<"))
_NUMERIC = re.compile(r"^(?:(?:tuple|list)\[)?(int|float)(?:, \.\.\.)?\]?(?: \| None)?$")


def numeric_kind(f: Field) -> str | None:
    """'int' / 'float' for a numeric field (or a tuple / list of numbers), else None."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    m = _NUMERIC.match(text.replace("Optional[", "").replace("typing.", ""))
    return m.group(1) if m else None


def valid_range(f: Field, kind: str) -> str:
    """The rule a field's values follow, in words: '>= 1 (an integer, at most 2147483647)', 'in [0, 1) (a finite
    number)'."""
    meta = f.metadata
    lo = ("[", meta["min"]) if "min" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["max"]) if "max" in meta else (")", meta["lt"]) if "lt" in meta else None
    what = "a finite number" if kind == "float" else "an integer" if hi else f"an integer, at most {INT_MAX}"
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]} ({what})"
    bounds = " ".join(f"{op} {meta[key]}" for key, op in BOUNDS if key in meta)
    return f"{bounds} ({what})" if bounds else what


def number_ok(value: Any, kind: str, f: Field) -> bool:
    """Whether one value is a number of the field's kind, finite, and within its bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if kind == "int" and not (isinstance(value, numbers.Integral) and abs(value) <= f.metadata.get("max", INT_MAX)):
        return False  # (ints compare exactly, however big)
    if not abs(value) <= sys.float_info.max:  # NaN, inf, and ints too big to become a float
        return False
    meta = f.metadata
    checks = (("min", lambda b: value >= b), ("gt", lambda b: value > b), ("max", lambda b: value <= b),
              ("lt", lambda b: value < b))
    return all(test(meta[key]) for key, test in checks if key in meta)


def flag_name(f: Field) -> str:
    """The command-line flag of a field (its first option string), as `cli.flags` makes it."""
    return f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))[0]


def check_numbers(obj: Any, where: str = "config", flags: bool = False) -> None:
    """ConfigError naming the field (with `flags`, its flag too) and its valid range when a numeric field of the
    dataclass `obj` is not finite, not an integer where it must be, or out of range; None values (unset) pass."""
    for f in fields(obj):
        kind = numeric_kind(f)
        value = getattr(obj, f.name, None)
        if kind is None or (value is None and "None" in str(f.type)):
            continue
        items = list(value) if isinstance(value, (tuple, list)) else [value]
        bad = [v for v in items if not number_ok(v, kind, f)]
        if bad:
            label = f"field '{f.name}'"
            if flags and not f.metadata.get("positional"):
                label = f"{flag_name(f)} / {label}"  # the flag as typed, and the field as a recipe names it
            each = "each value of " if isinstance(value, (tuple, list)) else ""
            got = repr(bad[0]) if len(repr(bad[0])) <= 40 else f"{repr(bad[0])[:37]}..."
            raise ConfigError(f"{where}: {each}{label} must be {valid_range(f, kind)}, got {got}")


def check_config(obj: C, where: str = "config", flags: bool = False) -> C:
    """`check_numbers`, then the class's own `validate(where)` (choices, fields that depend on each other)."""
    check_numbers(obj, where, flags)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        takes_where = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                          for p in inspect.signature(validate).parameters.values())
        validate(where) if takes_where else validate()
    return obj


MODEL_HELP = "hub id, local dir, .gguf file, or a named model ('default', 'gemma3-270m')"  # every --model flag


@dataclass
class PatchShape:
    """Where the LoRA patch goes and how big it is."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r", "min": 1})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is (alpha / r) B A", "gt": 0})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout", "min": 0, "lt": 1})
    target_modules: list[str] = field(
        default_factory=lambda: ["mlp.up"],
        metadata={"help": "what to patch, comma separated: roles mlp.up, mlp.gate, mlp.down, attn.q, attn.k, attn.v, "
                          "attn.o, groups mlp, attn, all-linear (resolved per architecture), or raw module names "
                          "(up_proj, mlp.c_fc)"},
    )
    layers: str = field(
        default="middle",
        metadata={"help": "layers: 'all', 'early' / 'middle' / 'late' third, a range '10-19' or a list '3,5,7'"},
    )

    def validate(self, where: str = "config") -> None:
        check_numbers(self, where)
        if not self.target_modules:
            raise ConfigError(f"{where}: field 'target_modules' is empty")


@dataclass
class GenerationConfig:
    """Batched generation settings shared by evaluation, anchors and early stopping."""

    max_new_tokens: int = field(default=64, metadata={"min": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    do_sample: bool = False
    temperature: float = field(default=1.0, metadata={"min": 0})
    top_p: float = field(default=1.0, metadata={"gt": 0, "max": 1})
    seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})
    # bf16 autocast while generating: ~1.8x faster on a CPU with native bf16 (AVX512-BF16 / AMX); greedy tokens
    # then differ from fp32 after the first near-tie, the refusal verdicts did not (docs/performance.md)
    bf16: bool = False

    def validate(self, where: str = "config") -> None:
        check_numbers(self, where)
        if self.do_sample and self.temperature == 0:
            raise ConfigError(f"{where}: field 'temperature' must be > 0 when sampling (do_sample); "
                              "use do_sample: false for greedy answers")


def _sequence(value: Any) -> list[Any]:
    """A comma-separated string or a YAML list as a list of items."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(value)


def _scalar(value: Any, t: str) -> Any:
    """One value as the scalar type `t` names (bool, int, float, str); TypeError / ValueError when it is not one."""
    if t.startswith("bool"):
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text in ("1", "true", "yes", "on")
        raise ValueError(value)
    if t.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, (list, tuple, dict)):
            raise TypeError(value)
        return int(value)
    if t.startswith("float"):
        if isinstance(value, (list, tuple, dict)):
            raise TypeError(value)
        return float(value)
    if t.startswith("str"):
        if isinstance(value, str) and value.lower() in ("none", "null", "") and "None" in t:
            return None
        return str(value)
    return value


def _coerce(value: Any, ftype: Any, name: str, where: str) -> Any:
    """Convert a YAML / CLI value to the field's declared type, or raise a ConfigError naming the field."""
    t = str(ftype).replace("<class '", "").replace("'>", "")
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where}: field '{name}' needs a value ({t}); leave it out for the default")
    try:
        if t.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError(value)
            return dict(value)
        if t.startswith(("list[", "tuple[")):
            items = [_scalar(v, t.split("[", 1)[1]) for v in _sequence(value)]
            return items if t.startswith("list") else tuple(items)
        return _scalar(value, t)
    except (TypeError, ValueError, OverflowError):
        got = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        raise ConfigError(f"{where}: field '{name}' expects {t}, got {got}") from None


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config", flags: bool = False) -> C:
    """Build a dataclass from a mapping, refusing unknown keys, coercing types and checking every value
    (`check_config`); the error names the bad field (with `flags`: its command-line flag)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of field: value, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        hint = ""
        for u in unknown:
            close = [k for k in known if k.replace("_", "") == u.replace("_", "").replace("-", "")]
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        raise ConfigError(f"{where}: unknown field(s) {unknown}{hint}; known fields: {sorted(known)}")
    kwargs = {k: _coerce(v, known[k].type, k, where) for k, v in data.items()}
    missing = sorted(k for k, f in known.items() if k not in kwargs and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    return check_config(cls(**kwargs), where, flags)


def load_yaml(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
    """Load a YAML recipe into `cls`; `overrides` (e.g. CLI flags) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config takes a YAML recipe file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # YAML Python cannot build: a date like 2020-13-45, a huge int, nesting
        raise ConfigError(f"{path}: not a usable recipe ({type(e).__name__}: {str(e)[:120]}); write plain "
                          "field: value pairs") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    try:
        json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{path}: holds an escape of an unpaired surrogate (e.g. \\ud800), which is no Unicode "
                          "character; remove it or write the intended character") from None
    data.update(overrides or {})
    return from_dict(cls, data, where=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Turn a layer selection into sorted layer indices.

    Accepts 'all', 'early' / 'middle' / 'late' (thirds of the model's layers; the remainder goes to the middle),
    an inclusive range '10-19', a comma list '3,5,7', or a list of ints.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        out = sorted({int(x) for x in spec})
    else:
        s = spec.strip().lower()
        third = num_layers // 3
        if s in ("early", "middle", "late"):
            bounds = {"early": (0, third), "middle": (third, num_layers - third), "late": (num_layers - third, num_layers)}
            lo, hi = bounds[s]
            out = list(range(lo, hi))
        elif m := _RANGE.match(s):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ConfigError(f"layers: range '{spec}' goes backwards")
            out = list(range(lo, hi + 1))
        else:
            try:
                out = sorted({int(x) for x in s.split(",") if x.strip()})
            except ValueError:
                raise ConfigError(
                    f"layers: cannot read '{spec}'; use 'all', 'early', 'middle', 'late', '10-19' or '3,5,7'"
                ) from None
    if not out:
        raise ConfigError(f"layers: '{spec}' selects no layer of a {num_layers}-layer model")
    bad = [i for i in out if i < 0 or i >= num_layers]
    if bad:
        raise ConfigError(f"layers: {bad} out of range for a model with {num_layers} layers (0..{num_layers - 1})")
    return out
