"""Dataclass configs for every component, with YAML load/dump and validation that names the bad field.

The CLI builds its flags from these dataclasses (the TRL / HfArgumentParser habit): a YAML recipe maps 1:1 onto
the fields and flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError


def safetypatch_home() -> Path:
    """Root of safetypatch's caches (models converted from GGUF, base-model answers, SVDs)."""
    return Path(os.environ.get("SAFETYPATCH_HOME", Path.home() / ".cache" / "safetypatch")).expanduser()


@dataclass
class PatchShape:
    """Where the LoRA patch goes and how big it is."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is (alpha / r) B A"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["up_proj"], metadata={"help": "module names to patch, comma separated"}
    )
    layers: str = field(
        default="middle",
        metadata={"help": "layers: 'all', 'early' / 'middle' / 'late' third, a range '10-19' or a list '3,5,7'"},
    )

    def validate(self, where: str = "config") -> None:
        if self.rank < 1:
            raise ConfigError(f"{where}: field 'rank' must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}: field 'alpha' must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: field 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{where}: field 'target_modules' is empty")


@dataclass
class GenerationConfig:
    """Batched generation settings shared by evaluation, anchors and early stopping."""

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # bf16 autocast while generating: ~1.8x faster on a CPU with native bf16 (AVX512-BF16 / AMX); greedy tokens
    # then differ from fp32 after the first near-tie, the refusal verdicts did not (docs/performance.md)
    bf16: bool = False


C = TypeVar("C")


def _coerce(value: Any, ftype: Any, name: str, where: str) -> Any:
    """Convert a YAML / CLI value to the field's declared type, or raise a ConfigError naming the field."""
    t = str(ftype)
    try:
        if value is None:
            return None
        if "list[str]" in t:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if t.startswith("bool") or t == "<class 'bool'>":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t.startswith("int") or t == "<class 'int'>":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float") or t == "<class 'float'>":
            return float(value)
        if "str" in t:
            if isinstance(value, str) and value.lower() in ("none", "null", "") and "None" in t:
                return None
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: field '{name}' expects {t.replace('<class ', '').rstrip('>')}, got {value!r}") from None
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build a dataclass from a mapping, refusing unknown keys and coercing types; names the bad field."""
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        hint = ""
        for u in unknown:
            close = [k for k in known if k.replace("_", "") == u.replace("_", "").replace("-", "")]
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        raise ConfigError(f"{where}: unknown field(s) {unknown}{hint}; known fields: {sorted(known)}")
    kwargs = {k: _coerce(v, known[k].type, k, where) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)  # type: ignore[attr-defined]
    return obj


def load_yaml(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
    """Load a YAML recipe into `cls`; `overrides` (e.g. CLI flags) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
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
