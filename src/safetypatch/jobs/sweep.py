"""The sweep job (`safetypatch sweep SWEEP.yaml --out DIR`): the papers' ablations as one command.

read the sweep (every point's recipe validated) -> check every point against the model's structure and estimate
its cost -> (`--dry-run`: print the points and stop) -> claim DIR (a rerun must ask for the same recipes) -> for
each point not finished: train (a killed point resumes from its checkpoint), evaluate with the sweep's suite
(recorded in the results DB as `sweep NAME/POINT`), analyse its geometry, then write point.json last.

    DIR/sweep.json                   the sweep: axes, every point's values and recipe
    DIR/points/P/train/              the training run (patch in train/patch, a full fine-tune in train/model)
    DIR/points/P/eval/               the suite run (summary.json, samples.jsonl)
    DIR/points/P/geometry/           geometry.json and the overlap heatmap
    DIR/points/P/point.json          written when the point is done: seconds per stage, the headline numbers

A point with point.json is skipped on a rerun; every stage inside a point is skipped when its output is complete.
`--jobs N` runs N points at once, one per GPU, each in its own process (`--only POINT`, CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..errors import ConfigError, OutputExistsError
from ..io_utils import atomic_write_json, utc_now
from .sweep_spec import Plan, Point, SweepConfig, SweepSpec, point_dir, point_status, unresolved

HEADLINE = (("harmful_refusal", "builtin_harmful", "none", "refusal_xstest", "refusal_rate"),
            ("benign_refusal", "builtin_benign", "none", "refusal_xstest", "refusal_rate"),
            ("xstest_safe_refusal", "xstest_safe", "none", "refusal_xstest", "refusal_rate"),
            ("kl_per_token", "kl_builtin_benign", "", "", "kl_per_token"),
            ("mmlu_accuracy", "mmlu", "", "", "accuracy"))


def plan_sweep(cfg: SweepConfig) -> Plan:
    """Read and check everything a sweep needs, load no weights: ConfigError before any point trains."""
    from ..evals.suite import load_suite
    from .sweep_cost import check_points, estimate, model_skeleton
    from .sweep_spec import load_sweep

    from ..evals.suite import default_data_root

    data_root = cfg.data_root if cfg.data_root is not None else default_data_root()
    spec = load_sweep(cfg.sweep, quick=cfg.quick, overrides={"model": cfg.model} if cfg.model else None,
                      data_root=data_root)
    suite = load_suite(spec.eval["suite"])
    models = sorted({p.recipe.model for p in spec.points})
    skeletons = {m: model_skeleton(m) for m in models}
    for m in models:
        check_points([p for p in spec.points if p.recipe.model == m], skeletons[m])
    estimates = {p.name: estimate(p.recipe, skeletons[p.recipe.model], suite, spec.eval, spec.geometry).total_s
                 for p in spec.points}
    names = [p.name for p in spec.points]
    only = [n.strip() for n in (cfg.only or "").split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only: {unknown} is not a point of sweep '{spec.name}'; its points: {', '.join(names)}")
    points = [p for p in spec.points if not only or p.name in only]
    return Plan(spec, suite, estimates, points)


def format_plan(plan: Plan, out: Path) -> str:
    """The points, their swept values, estimated seconds and status in OUT, and the total still to run."""
    from ..tables import render_table

    rows, left = [], 0.0
    for p in plan.points:
        status = point_status(out, p)
        left += 0.0 if status == "done" else plan.estimates[p.name]
        values = ", ".join(f"{k}={v}" for k, v in p.values.items())
        rows.append([p.name, values, f"{plan.estimates[p.name]:.0f}", measured_seconds(out, p), status])
    spec = plan.spec
    head = (f"sweep {spec.name}{' (quick)' if spec.quick else ''}: {len(plan.points)} points, suite "
            f"'{spec.eval['suite']}', model {spec.points[0].recipe.model}")
    table = render_table(["point", "values", "est. seconds", "measured", "status"], rows)
    return (f"{head}\n{table}\nestimated total {sum(plan.estimates[p.name] for p in plan.points):.0f} s, still to "
            f"run {left:.0f} s (estimates from this machine's rates, jobs/sweep_cost.py)")


def measured_seconds(out: Path, p: Point) -> str:
    """The seconds a finished point took (train + eval + geometry), '-' for one not finished."""
    f = point_dir(out, p.name) / "point.json"
    return f"{sum(json.loads(f.read_text())['seconds'].values()):.0f}" if f.exists() else "-"


def run_sweep(cfg: SweepConfig) -> str:
    """Run (or with `dry_run` list) the sweep's points; returns the closing text."""
    from ..io_utils import output_lock

    plan = plan_sweep(cfg)
    out = Path(cfg.out)
    if cfg.dry_run:
        return format_plan(plan, out)
    missing = unresolved(plan.spec)
    if missing:
        raise ConfigError(f"sweep '{plan.spec.name}' reads from the data root ({', '.join(missing[:3])} hold "
                          "'{data_root}'): give --data-root DIR (laid out like ../shared/data) or set SAFETYPATCH_DATA")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; --out takes a sweep directory (choose another --out)")
    if cfg.jobs > 1:
        from .sweep_workers import check_gpus

        check_gpus(cfg.jobs)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # held briefly: each point holds a lock of its own while it runs
        check_rerun(plan, out, cfg.overwrite)
        atomic_write_json(out / "sweep.json", merged_record(plan.spec, out))
    if cfg.jobs > 1:
        from .sweep_workers import run_parallel

        run_parallel(plan, cfg, out)
    else:
        run_points(plan, cfg, out)
    return format_results(plan, out)


def merged_record(spec: SweepSpec, out: Path) -> dict[str, Any]:
    """sweep.json for this run, keeping points of an earlier run of OUT that this one does not list."""
    record = spec.record()
    old = out / "sweep.json"
    if old.exists():
        names = {p["name"] for p in record["points"]}
        record["points"] += [p for p in json.loads(old.read_text())["points"] if p["name"] not in names]
    return record


def check_rerun(plan: Plan, out: Path, overwrite: bool) -> None:
    """A point already in OUT must have the recipe it had: else an error, or with `overwrite` its results go."""
    import shutil

    for p in plan.points:
        d = point_dir(out, p.name)
        recorded = d / "recipe.json"
        if not recorded.exists():
            continue
        old, new = json.loads(recorded.read_text()), to_dict(p.recipe)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if not changed:
            continue
        if not overwrite:
            raise OutputExistsError(f"{d}: point '{p.name}' was run with another recipe (changed: {', '.join(changed)}"
                                    "); choose another --out, or pass --overwrite to rerun it")
        shutil.rmtree(d)


def run_points(plan: Plan, cfg: SweepConfig, out: Path) -> None:
    """Every point in order under one progress bar whose total is the estimated seconds (so its remaining time
    is the estimate, corrected by the measured pace)."""
    from tqdm.auto import tqdm

    total = sum(plan.estimates[p.name] for p in plan.points)
    bar = tqdm(total=round(total), desc=f"sweep {plan.spec.name}", unit="est-s", position=0, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")
    with bar:
        for i, p in enumerate(plan.points):
            bar.set_postfix_str(f"point {i + 1}/{len(plan.points)} {p.name}")
            if point_status(out, p) != "done":
                print(point_line(run_point(plan.spec, p, cfg, out)), file=sys.stderr, flush=True)
            bar.update(round(plan.estimates[p.name]))


def run_point(spec: SweepSpec, p: Point, cfg: SweepConfig, out: Path) -> dict[str, Any]:
    """Train, evaluate, analyse one point (each stage skipped when its output is complete); point.json last."""
    from ..io_utils import output_lock

    d = point_dir(out, p.name)
    d.mkdir(parents=True, exist_ok=True)
    with output_lock(d):  # another process running this point: an error naming it, never two writers
        if (d / "point.json").exists():  # finished by another process meanwhile
            return json.loads((d / "point.json").read_text())
        return run_stages(spec, p, cfg, d)


def run_stages(spec: SweepSpec, p: Point, cfg: SweepConfig, d: Path) -> dict[str, Any]:
    atomic_write_json(d / "recipe.json", to_dict(p.recipe))
    seconds: dict[str, float] = {}
    output = train_point(p, d, seconds)
    summary = eval_point(spec, p, cfg, d, output, seconds)
    has_geometry = analyse_point(spec, p, d, output, seconds)
    record = {"name": p.name, "sweep": spec.name, "values": p.values, "recipe": to_dict(p.recipe), "status": "done",
              "seconds": seconds, "output": str(output.relative_to(d)), "eval": "eval",
              "geometry": "geometry" if has_geometry else None, "finished": utc_now(),
              "model_fingerprint": summary.get("model_fingerprint"), "headline": headline(summary)}
    atomic_write_json(d / "point.json", record)
    return record


def train_point(p: Point, d: Path, seconds: dict[str, float]) -> Path:
    from .train import MARKER, train

    run = d / "train"
    output = run / ("patch" if p.recipe.method == "lora" else "model")
    if not output.exists():
        train(p.recipe, run, resume=(run / MARKER).exists())
    stats = json.loads((run / "train_stats.json").read_text())
    seconds["train"] = float(stats.get("total_seconds") or stats.get("train_seconds") or 0.0)
    return output


def eval_point(spec: SweepSpec, p: Point, cfg: SweepConfig, d: Path, output: Path,
               seconds: dict[str, float]) -> dict[str, Any]:
    from ..evals.suite import SuiteRunConfig
    from .suite import run_suite

    edir = d / "eval"
    if not (edir / "summary.json").exists():
        lora = p.recipe.method == "lora"
        run_cfg = SuiteRunConfig(suite=spec.eval["suite"], model=p.recipe.model,
                                 patch=str(output) if lora else None, finetuned=None if lora else str(output),
                                 data_root=cfg.data_root, db=cfg.db, limit=spec.eval.get("limit"),
                                 max_new_tokens=spec.eval.get("max_new_tokens"),
                                 batch_size=spec.eval.get("batch_size"), name=f"sweep {spec.name}/{p.name}",
                                 chat_template=p.recipe.chat_template)
        run_suite(run_cfg, edir)
    summary = json.loads((edir / "summary.json").read_text())
    seconds["eval"] = float(summary.get("seconds") or 0.0)
    return summary


def analyse_point(spec: SweepSpec, p: Point, d: Path, output: Path, seconds: dict[str, float]) -> bool:
    if not spec.geometry:
        return False
    from .analyze import AnalyzeConfig, run_analyze

    gdir = d / "geometry"
    if not (gdir / "geometry.json").exists():
        t0 = time.time()
        lora = p.recipe.method == "lora"
        run_analyze(AnalyzeConfig(model=p.recipe.model, patch=str(output) if lora else None,
                                  finetuned=None if lora else str(output), out=str(gdir), no_shift=True,
                                  chat_template=p.recipe.chat_template))
        seconds["geometry"] = round(time.time() - t0, 1)
    return True


def headline(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{variant: {harmful_refusal, benign_refusal, kl_per_token, mmlu_accuracy}} from a suite summary (what the
    suite measured of these)."""
    out: dict[str, dict[str, float]] = {}
    for m in summary.get("metrics", []):
        for name, bench, attack, judge, metric in HEADLINE:
            if (m["benchmark"], m["attack"], m["judge"], m["metric"]) == (bench, attack, judge, metric):
                if m["variant"] in ("base", "patched"):
                    out.setdefault(m["variant"], {})[name] = m["value"]
    return out


def point_line(rec: dict[str, Any]) -> str:
    """One line for a finished point's record (point.json): its seconds and headline numbers (patched)."""
    h = rec["headline"].get("patched", {})
    parts = [f"{k.replace('_', ' ')} {v:.0%}" if "refusal" in k or "accuracy" in k else f"{k.replace('_', ' ')} "
             f"{v:.3f}" for k, v in h.items() if v is not None]
    return f"point {rec['name']} done in {sum(rec['seconds'].values()):.0f} s: " + ", ".join(parts)


def format_results(plan: Plan, out: Path) -> str:
    """One row per point: the headline numbers (patched; base in the first row) and seconds."""
    from ..tables import render_table

    cols = [h[0] for h in HEADLINE]
    rows, base = [], None
    for p in plan.points:
        f = point_dir(out, p.name) / "point.json"
        if not f.exists():
            rows.append([p.name, *["-"] * len(cols), "not finished"])
            continue
        rec = json.loads(f.read_text())
        numbers = headline(json.loads((f.parent / "eval" / "summary.json").read_text()))  # this version's columns
        base = base or numbers.get("base")
        rows.append([p.name, *cells(numbers.get("patched", {}), cols), overlap(f.parent / "geometry"),
                     f"{sum(rec['seconds'].values()):.0f}"])
    if base:
        rows.insert(0, ["(base)", *cells(base, cols), "-", "-"])
    table = render_table(["point", *cols, "overlap/chance", "seconds"], rows)
    return f"{table}\nsweep directory: {out}  (safetypatch report {out} -o report.html)"


def overlap(geometry_dir: Path) -> str:
    """Median over the patched modules of ||dW V_32||^2 / ||dW||^2 divided by its value for a random 32-dimensional
    subspace (1: as orthogonal to W0's top-32 right singular directions as chance), from geometry.json."""
    import statistics

    f = geometry_dir / "geometry.json"
    if not f.exists():
        return "-"
    ratios = [r[f"energy_right_k{k}"] / r[f"random_energy_right_k{k}"] for r in json.loads(f.read_text())
              for k in [max(int(key.rsplit("k", 1)[1]) for key in r if key.startswith("energy_right_k"))]
              if r.get(f"random_energy_right_k{k}")]
    return f"{statistics.median(ratios):.2f}" if ratios else "-"


def cells(values: dict[str, float], cols: list[str]) -> list[str]:
    def fmt(k: str) -> str:
        v = values.get(k)
        return "-" if v is None else (f"{v:.3f}" if k == "kl_per_token" else f"{v:.0%}")
    return [fmt(k) for k in cols]
