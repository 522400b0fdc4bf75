"""The runs of a report, read from what safetypatch wrote. Each input path is one of:

- a demo run directory (`safetypatch demo --out DIR`): DIR/summary.json (`results.{harmful,benign}`), DIR/samples.jsonl,
  DIR/patch/patch.json (base-model fingerprint, calibration);
- a sweep directory (`safetypatch sweep`): DIR/sweep.json (kind 'safetypatch-sweep', axes, points) and per point
  DIR/points/NAME/point.json, its suite eval (`eval`), its patch (`output`) and geometry.json (`geometry`); a point
  without point.json is listed as not finished;
- a suite eval directory (`safetypatch eval --suite NAME --out DIR`): DIR/summary.json (`suite`, `metrics`) and
  DIR/samples.jsonl.

A path may also name the sweep.json or summary.json itself. Anything else is a ConfigError naming the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .files import DAMAGED, need, optional, read_json, read_jsonl, read_object
from .metrics import categories, demo_sides, suite_sides
from .rows import RunRow, assign_models, number

SWEEP_KIND = "safetypatch-sweep"
EXPECTED = ("expected a demo run directory (summary.json from `safetypatch demo --out DIR`), a sweep directory "
            "(sweep.json from `safetypatch sweep`) or a suite eval directory (summary.json from `safetypatch eval "
            "--suite NAME --out DIR`)")


def detect(path: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """('demo' | 'sweep' | 'suite', the directory, its summary.json or sweep.json) for an input path."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file or directory; {EXPECTED}")
    if p.is_file() and p.name in ("sweep.json", "summary.json"):
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{p}: not a directory; {EXPECTED}")
    if (p / "sweep.json").exists():
        sweep = read_object(p / "sweep.json")
        if sweep.get("kind") != SWEEP_KIND:
            raise ConfigError(f"{p / 'sweep.json'}: field 'kind' is {sweep.get('kind')!r}, expected '{SWEEP_KIND}': "
                              "not a sweep written by `safetypatch sweep`")
        return "sweep", p, sweep
    if (p / "summary.json").exists():
        summary = read_object(p / "summary.json")
        if "suite" in summary and isinstance(summary.get("metrics"), list):
            return "suite", p, summary
        if isinstance(summary.get("results"), dict) and "harmful" in summary["results"]:
            return "demo", p, summary
        raise ConfigError(f"{p / 'summary.json'}: neither a demo summary (no 'results.harmful') nor a suite summary "
                          f"(no 'suite' and 'metrics'); {EXPECTED}")
    raise ConfigError(f"{p}: holds no sweep.json or summary.json; {EXPECTED}")


def patch_meta(patch_dir: Path | None) -> dict[str, Any]:
    """A patch's patch.json, {} when there is none (a full fine-tune, a run without a patch)."""
    if patch_dir is None or not (patch_dir / "patch.json").is_file():
        return {}
    return read_object(patch_dir / "patch.json")


def add_patch_facts(row: RunRow, meta: dict[str, Any], where: Path) -> None:
    """Fingerprint, architecture, calibration, size and (when the row has none) recipe from a patch.json."""
    base = optional(meta, "base_model", dict, where, {})
    fp = optional(base, "fingerprint", dict, f"{where} (base_model)", {})
    if fp and row.fingerprint is None:
        from ..modeling import fingerprint_id

        row.fingerprint = fingerprint_id(fp)
    row.architecture = row.architecture or fp.get("architecture")
    if row.model == "?" and isinstance(base.get("spec"), str):
        row.model = base["spec"]
    calibration = optional(meta, "calibration", dict, where)
    if calibration is not None and isinstance(calibration.get("curve"), list):
        row.calibration = calibration
    weights = optional(meta, "weights", dict, where, {})
    if row.patch_bytes is None and isinstance(weights.get("bytes"), int):
        row.patch_bytes = weights["bytes"]
    row.recipe = row.recipe or optional(meta, "recipe", dict, where, {})


def samples_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "samples.jsonl"
    return read_jsonl(path) if path.is_file() else []


def demo_row(d: Path, summary: dict[str, Any]) -> RunRow:
    """A `safetypatch demo` run."""
    where = d / "summary.json"
    judge = optional(summary, "primary_judge", str, where, "refusal_xstest")
    sides = demo_sides(summary, judge, where)
    row = RunRow(name=d.name, kind="demo", path=str(d), model=optional(summary, "model", str, where, "?"),
                 recipe=optional(summary, "recipe", dict, where, {}), base=sides["base"], patched=sides["patched"],
                 judge=judge, patch_bytes=optional(summary, "patch_bytes", int, where))
    row.seconds = {k: v for k in ("train", "total") if (v := number(summary.get(f"{k}_seconds"))) is not None}
    patch = d / "patch"
    if not patch.is_dir() and isinstance(summary.get("patch"), str):
        patch = Path(summary["patch"])
    add_patch_facts(row, patch_meta(patch), patch / "patch.json")
    row.categories = categories(samples_of(d), judge)
    return row


def fill_from_suite(row: RunRow, d: Path, summary: dict[str, Any]) -> None:
    """Numbers, judge, model and per-category refusal of a suite eval directory `d` into `row`."""
    where = d / "summary.json"
    sides, row.judge, chosen = suite_sides(summary, where)
    row.base, row.patched = sides.get("base"), sides.get("patched")
    row.model = optional(summary, "model", str, where, row.model)
    row.fingerprint = optional(summary, "model_fingerprint", str, where)
    row.categories = categories(samples_of(d), row.judge, chosen)


def suite_row(d: Path, summary: dict[str, Any]) -> RunRow:
    """A `safetypatch eval --suite` run."""
    row = RunRow(name=d.name, kind="suite", path=str(d))
    fill_from_suite(row, d, summary)
    if row.patched is None:
        row.status = "base only"
    seconds = number(summary.get("seconds"))
    row.seconds = {"eval": seconds} if seconds is not None else {}
    patch = summary.get("patch")
    if isinstance(patch, str):
        add_patch_facts(row, patch_meta(Path(patch)), Path(patch) / "patch.json")
    return row


def point_dir(d: Path, name: str, where: str) -> Path:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: point name {name!r} is not a plain directory name; {DAMAGED}")
    return d / "points" / name


def geometry_of(path: Path) -> list[dict[str, Any]]:
    """geometry.json's records (each with a layer and a module); ConfigError naming the file otherwise."""
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) and "layer" in r and "module" in r
                                                 for r in records):
        raise ConfigError(f"{path}: expected a list of records with 'layer' and 'module' (`safetypatch analyze` "
                          f"writes it); {DAMAGED}")
    return records


def point_row(d: Path, sweep: dict[str, Any], point: dict[str, Any], i: int) -> RunRow:
    """One point of a sweep: not finished (no point.json), failed (its status), or read in full."""
    where = f"{d / 'sweep.json'} (points[{i}])"
    name = need(point, "name", str, where)
    row = RunRow(name=name, kind="sweep-point", path=str(point_dir(d, name, where)), sweep=sweep["name"],
                 axes=list(sweep["axes"]), values=optional(point, "values", dict, where, {}),
                 recipe=optional(point, "recipe", dict, where, {}), model=optional(sweep, "model", str, where, "?"))
    pdir = Path(row.path)
    if not (pdir / "point.json").is_file():
        row.status = "not finished"
        return row
    pj = read_object(pdir / "point.json")
    pwhere = pdir / "point.json"
    row.status = optional(pj, "status", str, pwhere, "done")
    row.seconds = {k: x for k, v in optional(pj, "seconds", dict, pwhere, {}).items() if (x := number(v)) is not None}
    row.recipe = optional(pj, "recipe", dict, pwhere, row.recipe)
    if row.status != "done":
        return row
    eval_dir = pdir / need(pj, "eval", str, pwhere)
    if not (eval_dir / "summary.json").is_file():
        raise ConfigError(f"{pwhere}: the point is marked done but {eval_dir / 'summary.json'} is missing; rerun "
                          "the sweep (it redoes what is missing) or leave this sweep out")
    kind, _, summary = detect(eval_dir)
    if kind != "suite":
        raise ConfigError(f"{eval_dir / 'summary.json'}: not a suite eval summary (field 'suite' or 'metrics' "
                          f"missing); {DAMAGED}")
    fill_from_suite(row, eval_dir, summary)
    row.fingerprint = row.fingerprint or optional(pj, "model_fingerprint", str, pwhere)
    output = optional(pj, "output", str, pwhere)
    if output:
        add_patch_facts(row, patch_meta(pdir / output), pdir / output / "patch.json")
    geometry = optional(pj, "geometry", str, pwhere)
    if geometry and (pdir / geometry / "geometry.json").exists():
        row.geometry = geometry_of(pdir / geometry / "geometry.json")
    return row


def sweep_rows(d: Path, sweep: dict[str, Any]) -> list[RunRow]:
    """Every point of a `safetypatch sweep` directory, in the sweep's order."""
    where = d / "sweep.json"
    need(sweep, "name", str, where)
    axes = need(sweep, "axes", list, where)
    if not all(isinstance(a, str) for a in axes):
        raise ConfigError(f"{where}: field 'axes' must list axis names (strings); {DAMAGED}")
    points = need(sweep, "points", list, where)
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: points[{i}] is a {type(p).__name__}, expected an object; {DAMAGED}")
    return [point_row(d, sweep, p, i) for i, p in enumerate(points)]


def read_runs(paths: list[str]) -> list[RunRow]:
    """Every run of the inputs, in the order given (a path given twice is read once), names made unique, model
    groups assigned (`rows.assign_models`)."""
    if not paths:
        raise ConfigError(f"no input given; {EXPECTED}")
    rows: list[RunRow] = []
    seen: set[Path] = set()
    for path in paths:
        kind, d, data = detect(path)
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        if kind == "sweep":
            rows += sweep_rows(d, data)
        else:
            rows.append(demo_row(d, data) if kind == "demo" else suite_row(d, data))
    names: dict[str, int] = {}
    for r in rows:
        names[r.name] = names.get(r.name, 0) + 1
        if names[r.name] > 1:
            r.name = f"{r.name} #{names[r.name]}"
    assign_models(rows)
    return rows
