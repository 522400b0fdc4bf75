"""Command-line flags generated from config dataclasses (the TRL `HfArgumentParser` habit): a field is its flag, so
every default is written once, in the dataclass, and argparse reads it from there.

Field metadata (`dataclasses.field(metadata={...})`): "help"; "flags" (option strings, default `--field-name`);
"positional" (True); "nargs"; "metavar"; "required" (True); "choices"; "action" ("store_true" | "append");
"one_of" (a name: the fields sharing it form a required mutually exclusive group). A bool field whose default is
False is a `store_true` switch; int and float fields are converted by argparse, and `converters` gives a field
another converter (a comma-separated list, say). Two layouts:
- `add_flags` / `config_from_args`: typed flags whose argparse default is the dataclass default; the namespace
  builds the dataclass back.
- `add_recipe_flags` / `recipe_from_args`: recipe classes (TrainConfig): every field a value flag with default
  None, converted and validated by `config.from_dict` (so `--freeze-a false` works), overriding `--config` YAML.
Numbers are checked in one place, `config.check_numbers`: finite, integers where the field is an int, within the
range of the field's "min" / "gt" / "max" / "lt" metadata. `config_from_args` and `recipe_from_args` check the
config they build (then the class's own `validate(where)`), and every command made by `add_command` checks the
numeric flags of all its classes before it runs, so a bad number fails before any output exists or any model
loads. Every parser is a `Parser`: no abbreviated flags (`--max-new-token` is not `--max-new-tokens`).
Nothing here imports torch: building the parser must stay instant.
"""

from __future__ import annotations

import argparse
import functools
import re
from dataclasses import MISSING, Field, fields
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..config import check_config, check_numbers, from_dict, load_yaml

C = TypeVar("C")
Converter = Callable[[str], Any]
_SCALARS: dict[str, Converter] = {"int": int, "float": float, "str": str}
_KEYS = ("help", "nargs", "metavar", "choices", "action")
WHERE = "command line"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviated long options; its sub-parsers (`add_subparsers` makes them of
    the parent's class) are `Parser`s too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def field_default(f: Field) -> Any:
    """The dataclass default of `f` (a fresh one from its factory), None when it has none."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def shown(value: Any) -> str:
    """A default as a user would type it: lists and tuples comma separated."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def shows(default: Any) -> bool:
    """Whether a flag's help states its default (not for None, False or an empty list)."""
    return default is not None and default is not False and default != []


def _annotation(f: Field) -> str:
    """The field's annotation as written (`int | None`, `list[str]`), with or without postponed annotations."""
    if isinstance(f.type, str):
        return f.type
    return f.type.__name__ if type(f.type) is type else str(f.type).replace("typing.", "")


def _converter(f: Field, converters: Mapping[str, Converter]) -> Converter:
    """int / float / str from the field's annotation (`int | None`, `list[str]`, ...) unless `converters` names it."""
    if f.name in converters:
        return converters[f.name]
    text = _annotation(f)
    if text.startswith(("tuple", "dict")):
        raise TypeError(f"field '{f.name}' ({text}) needs a converter to become a flag")
    names = {w for w in re.findall(r"[A-Za-z_]+", text) if w not in ("None", "Optional", "list")}
    if len(names) != 1 or next(iter(names)) not in _SCALARS:
        raise TypeError(f"field '{f.name}' ({text}) needs a converter to become a flag")
    return _SCALARS[next(iter(names))]


def flag_spec(f: Field, converters: Mapping[str, Converter] = {}) -> tuple[list[str], dict[str, Any]]:
    """The option strings and `add_argument` keywords of one field."""
    meta = f.metadata
    kw = {k: meta[k] for k in _KEYS if k in meta}
    default = field_default(f)
    if _annotation(f) == "bool" and default is False and "action" not in kw:
        kw["action"] = "store_true"
    if kw.get("action") != "store_true":
        convert = _converter(f, converters)
        if convert is not str:
            kw["type"] = convert
    if meta.get("positional"):
        return [f.name], kw if default is None else {**kw, "default": default}
    kw["dest"] = f.name
    if meta.get("required"):
        kw["required"] = True
    else:
        kw["default"] = default
        if shows(default) and "(default" not in kw.get("help", "(default"):
            kw["help"] = f"{kw['help']} (default: {shown(default)})"
    return list(meta.get("flags", (f"--{f.name.replace('_', '-')}",))), kw


def add_flags(p: argparse.ArgumentParser, cls: type, converters: Mapping[str, Converter] = {},
              skip: Sequence[str] = ()) -> None:
    """One flag per field of `cls` (in field order), fields in `skip` left out."""
    groups: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        names, kw = flag_spec(f, converters)
        one_of = f.metadata.get("one_of")
        if one_of and one_of not in groups:
            groups[one_of] = p.add_mutually_exclusive_group(required=True)
        (groups[one_of] if one_of else p).add_argument(*names, **kw)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The dataclass back from a namespace that `add_flags(p, cls)` filled (fields without a flag: defaults),
    checked (`config.check_config`): ConfigError naming the flag and its valid range."""
    return check_config(built(cls, args), WHERE, flags=True)


def built(cls: type[C], args: argparse.Namespace) -> C:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)})


def add_recipe_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """A value flag per field of a recipe class, default None (unset: the recipe's or the dataclass's value)."""
    group = p.add_argument_group(f"{cls.__name__} fields (also settable in --config YAML)")
    for f in fields(cls):
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar="V",
                           help=f"{f.metadata.get('help', '')} (default: {shown(field_default(f))})")


def recipe_from_args(cls: type[C], args: argparse.Namespace, recipe: str | None) -> C:
    """`cls` from the YAML `recipe` (if any) with the flags given on the command line overriding it."""
    overrides = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    if recipe:
        return load_yaml(cls, recipe, overrides)
    return from_dict(cls, overrides, where=WHERE, flags=True)


def add_command(sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int], *classes: type,
                converters: Mapping[str, Converter] = {}, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A sub-command whose flags are the fields of `classes`, run by `func(args)` once every numeric flag of them
    is in range."""
    p = sub.add_parser(name, help=help, allow_abbrev=False)
    for cls in classes:
        add_flags(p, cls, converters, skip)
    p.set_defaults(func=numbers_checked(func, classes))
    return p


def numbers_checked(func: Callable[[argparse.Namespace], int], classes: Sequence[type]
                    ) -> Callable[[argparse.Namespace], int]:
    """`func`, run only after `config.check_numbers` passed for every class's fields in the namespace."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        for cls in classes:
            check_numbers(built(cls, args), WHERE, flags=True)
        return func(args)
    return run
