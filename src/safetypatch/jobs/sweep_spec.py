"""A sweep file: a base recipe plus a grid or a list of points over recipe keys, each point a full TrainConfig.

    name: rank                       # the sweep's name (default: the file's stem)
    description: ...
    recipe: {epochs: 3}              # TrainConfig fields every point starts from (default: the demo's recipe)
    grid: {rank: [1, 2, 4]}          # the product over every key's values ...
    points:                          # ... or / and an explicit list (each may carry a `name`)
      - {name: full, method: full, lr: 2.0e-5}
    eval: {suite: sweep, limit: 40, max_new_tokens: 32}   # the named suite every point is evaluated with
    geometry: true                   # analyse each point's update against the base weights
    quick: {recipe: {epochs: 1}, eval: {limit: 20}}       # what `--quick` changes, for a first look

With both `grid` and `points`, every point is crossed with the grid. Every point's recipe is built and validated
(`TrainConfig`, the same checks as `safetypatch train`) when the file is read, so a bad key or value fails before
anything is trained; errors name the file, the point and the key, and list the valid keys.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import from_dict, to_dict
from ..data.paths import shipped_or_path
from ..data.text import read_yaml_mapping
from ..errors import ConfigError
from ..training.config import TrainConfig

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
TOP_LEVEL = ("name", "description", "recipe", "grid", "points", "eval", "geometry", "quick")
EVAL_KEYS = ("suite", "limit", "max_new_tokens", "batch_size")
QUICK_KEYS = ("recipe", "eval", "description")
DEFAULT_SUITE = "sweep"
DATA_ROOT = "{data_root}"  # replaced by --data-root / $SAFETYPATCH_DATA


@dataclass
class Point:
    """One training run of a sweep: its name (a directory name), the swept values, and the whole recipe."""

    name: str
    values: dict[str, Any]
    recipe: TrainConfig


@dataclass
class SweepSpec:
    name: str
    source: str
    description: str = ""
    base_recipe: dict[str, Any] = field(default_factory=dict)
    axes: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=lambda: {"suite": DEFAULT_SUITE})
    geometry: bool = True
    quick: bool = False

    def record(self) -> dict[str, Any]:
        """sweep.json: what the report and a rerun read back."""
        return {"kind": "safetypatch-sweep", "name": self.name, "source": self.source,
                "description": self.description, "quick": self.quick, "axes": self.axes,
                "suite": self.eval.get("suite", DEFAULT_SUITE), "eval": self.eval, "geometry": self.geometry,
                "model": self.points[0].recipe.model if self.points else None, "base_recipe": self.base_recipe,
                "points": [{"name": p.name, "values": p.values, "recipe": to_dict(p.recipe)} for p in self.points]}


def point_dir(out: Path, name: str) -> Path:
    return out / "points" / name


def point_status(out: Path, p: Point) -> str:
    d = point_dir(out, p.name)
    if (d / "point.json").exists():
        return "done"
    return "started" if d.exists() else "new"


@dataclass(kw_only=True)
class SweepConfig:
    sweep: str = field(metadata={"positional": True, "metavar": "SWEEP",
                                 "help": "a shipped sweep name (rank, modules, layers, lora_vs_full, data_ratio) "
                                         "or a sweep YAML file"})
    out: str = field(metadata={"required": True, "help": "sweep directory (points go to OUT/points/NAME)"})
    quick: bool = field(default=False, metadata={"help": "apply the sweep's `quick` block: fewer steps and "
                                                         "prompts, for a first look"})
    dry_run: bool = field(default=False, metadata={"help": "list the points and their estimated cost, run nothing"})
    jobs: int = field(default=1, metadata={"min": 1, "help": "points at once, one per GPU (needs N GPUs)"})
    only: str | None = field(default=None, metadata={"help": "run only these points (comma separated names)"})
    model: str | None = field(default=None, metadata={"help": "base model for every point (overrides the sweep)"})
    data_root: str | None = field(default=None, metadata={
        "help": "directory laid out like ../shared/data for the suite's public sets (default $SAFETYPATCH_DATA)"})
    db: str | None = field(default=None, metadata={"help": "results DB (default $SAFETYPATCH_HOME/results.db)"})
    overwrite: bool = field(default=False, metadata={
        "help": "rerun points of OUT whose recipe changed (their old results are removed)"})


@dataclass
class Plan:
    spec: SweepSpec
    suite: Any
    estimates: dict[str, float]
    points: list[Point]  # the points to run (after --only)


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def sweep_path(spec: str) -> Path:
    """A shipped sweep by name, or a YAML file by path."""
    return shipped_or_path(spec, SWEEPS_DIR, "sweep", ConfigError)


def read_sweep_file(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, ConfigError, TOP_LEVEL, "'grid' or 'points'")


def load_sweep(spec: str, quick: bool = False, overrides: dict[str, Any] | None = None,
               data_root: str | None = None) -> SweepSpec:
    """Read a sweep (shipped name or path), apply its `quick` block when asked and `overrides` (recipe fields from
    the command line, e.g. model) to every point, and build every point's recipe. `{data_root}` in a value is
    replaced by `data_root` when given (else kept, and `unresolved` names it)."""
    path = sweep_path(spec)
    source = str(path)
    data = read_sweep_file(path)
    if data_root is not None:
        data = substitute(data, data_root)
    recipe = mapping(data.get("recipe"), "recipe", source)
    ev = mapping(data.get("eval"), "eval", source)
    if quick:
        q = mapping(data.get("quick"), "quick", source)
        bad = sorted(set(q) - set(QUICK_KEYS))
        if bad:
            raise ConfigError(f"{source}: quick: unknown key(s) {bad}; valid: {', '.join(QUICK_KEYS)}")
        recipe = {**recipe, **mapping(q.get("recipe"), "quick.recipe", source)}
        ev = {**ev, **mapping(q.get("eval"), "quick.eval", source)}
    recipe = {**recipe, **(overrides or {})}
    sweep = SweepSpec(name=sweep_name(data.get("name"), path), source=source, quick=quick,
                      description=str(data.get("description") or "").strip(), base_recipe=recipe,
                      eval=eval_settings(ev, source), geometry=flag(data.get("geometry", True), "geometry", source))
    check_keys(recipe, f"{source}: recipe")
    combos, sweep.axes = expand(data, source)
    sweep.points = build_points(combos, recipe, source)
    for p in sweep.points:  # a listed point that leaves an axis at the base recipe still has a value on it
        p.values = {k: p.values.get(k, getattr(p.recipe, k)) for k in sweep.axes}
    return sweep


def substitute(value: Any, data_root: str) -> Any:
    """`{data_root}` replaced in every string of a parsed YAML value."""
    if isinstance(value, str):
        return value.replace(DATA_ROOT, str(Path(data_root).expanduser()))
    if isinstance(value, list):
        return [substitute(v, data_root) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, data_root) for k, v in value.items()}
    return value


def unresolved(sweep: SweepSpec) -> list[str]:
    """'point.key' for every recipe value that still holds `{data_root}`."""
    return [f"{p.name}.{k}" for p in sweep.points for k, v in to_dict(p.recipe).items()
            if isinstance(v, str) and DATA_ROOT in v]


def mapping(value: Any, key: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{source}: '{key}' must be a mapping of key: value, got {type(value).__name__}")
    return dict(value)


def flag(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    return value


def sweep_name(value: Any, path: Path) -> str:
    name = path.stem if value is None else value
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{path}: 'name' must be letters, digits, '.', '_' or '-', got {name!r}")
    return name


def eval_settings(ev: dict[str, Any], source: str) -> dict[str, Any]:
    bad = sorted(set(ev) - set(EVAL_KEYS))
    if bad:
        raise ConfigError(f"{source}: eval: unknown key(s) {bad}; valid: {', '.join(EVAL_KEYS)}")
    for k in ("limit", "max_new_tokens", "batch_size"):
        v = ev.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{source}: eval.{k} must be an integer >= 1 (or left out), got {v!r}")
    suite = ev.get("suite", DEFAULT_SUITE)
    if not isinstance(suite, str) or not suite:
        raise ConfigError(f"{source}: eval.suite must be a suite name or a path to a suite YAML, got {suite!r}")
    return {**ev, "suite": suite}


def recipe_keys() -> list[str]:
    return sorted(f.name for f in fields(TrainConfig))


def check_keys(values: dict[str, Any], where: str) -> None:
    """Every key must be a recipe field: the error names the bad key and lists the valid ones."""
    known = recipe_keys()
    for k in values:
        if k not in known:
            close = difflib.get_close_matches(str(k).replace("-", "_"), known, n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: '{k}' is not a recipe field{hint}; valid keys: {', '.join(known)}")


def expand(data: dict[str, Any], source: str) -> tuple[list[tuple[str | None, dict[str, Any]]], list[str]]:
    """(explicit name or None, swept values) for every point, and the swept keys in file order."""
    grid = mapping(data.get("grid"), "grid", source)
    listed = data.get("points")
    if not grid and not listed:
        raise ConfigError(f"{source}: no points: give 'grid' (key: [values]) or 'points' (a list of mappings)")
    check_keys(grid, f"{source}: grid")
    for k, vs in grid.items():
        if not isinstance(vs, list) or not vs:
            raise ConfigError(f"{source}: grid.{k} must be a non-empty list of values, got {vs!r}")
    named = [(None, {})] if listed is None else listed_points(listed, source)
    axes = list(dict.fromkeys([k for _, v in named for k in v] + list(grid)))
    product = [dict(zip(grid, vs)) for vs in itertools.product(*grid.values())] if grid else [{}]
    return [(n, {**v, **g}) for n, v in named for g in product], axes


def listed_points(listed: Any, source: str) -> list[tuple[str | None, dict[str, Any]]]:
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{source}: 'points' must be a non-empty list of mappings (recipe key: value)")
    out = []
    for i, raw in enumerate(listed, 1):
        values = mapping(raw, f"points[{i}]", source)
        name = values.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{source}: points[{i}].name must be a string, got {name!r}")
        check_keys(values, f"{source}: points[{i}]")
        out.append((name, values))
    return out


def point_name(values: dict[str, Any]) -> str:
    """A directory-safe name from the swept values: {'rank': 4, 'layers': 'middle'} -> 'rank-4_layers-middle'."""
    def text(v: Any) -> str:
        return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    raw = "_".join(f"{k}-{text(v)}" for k, v in values.items()) or "base-recipe"
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", raw)[:120]


def build_points(combos: list[tuple[str | None, dict[str, Any]]], recipe: dict[str, Any], source: str) -> list[Point]:
    points: list[Point] = []
    seen: dict[str, int] = {}
    for i, (name, values) in enumerate(combos, 1):
        name = name or point_name(values)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", name):
            raise ConfigError(f"{source}: point {i}: name {name!r} must be letters, digits, '.', '+', '_' or '-'")
        if name in seen:
            raise ConfigError(f"{source}: point {i} ({name}) repeats point {seen[name]}; give each a distinct name")
        seen[name] = i
        cfg = from_dict(TrainConfig, {**recipe, **values}, where=f"{source}: point {name}")
        cfg.validate(f"{source}: point {name}")
        points.append(Point(name=name, values=values, recipe=cfg))
    return points
