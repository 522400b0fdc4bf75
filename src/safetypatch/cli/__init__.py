"""Command line: `safetypatch train | eval | demo | runs | compare | patch ...`.

Flags for training are generated from the TrainConfig dataclass (its field help is the flag help); `--config
recipe.yaml` loads a recipe and flags given on the command line override it. Heavy imports happen inside the
command functions so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..config import GenerationConfig, from_dict, load_yaml
from ..training.config import TrainConfig


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    group = p.add_argument_group(f"{cls.__name__} fields (also settable in --config YAML)")
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, list) else default
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar="V",
                           help=f"{f.metadata.get('help', '')} (default: {shown})")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.config:
        return load_yaml(TrainConfig, args.config, overrides)
    return from_dict(TrainConfig, overrides, where="command line")


# ------------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    cfg = _train_config(args)
    res = train(cfg, args.out, resume=args.resume)
    print(json.dumps({"output": str(res.output_dir), **res.stats}, indent=2, default=str))
    return 0


def _judge_models(values: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, spec = v.partition("=")
        if sep and name and spec and "/" not in name:
            out[name.strip()] = spec.strip()
        else:
            out["*"] = v.strip()
    return out


def cmd_eval_suite(args: argparse.Namespace) -> int:
    from ..evals.suite import SuiteRunConfig, format_table, run_suite

    if args.prompts:
        print("error: give either --suite or --prompts, not both", file=sys.stderr)
        return 2
    cfg = SuiteRunConfig(suite=args.suite, model=args.model, patch=args.patch, finetuned=args.finetuned,
                         data_root=args.data_root,
                         db=args.db, record=not args.no_db, judge_models=_judge_models(args.judge_model),
                         limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         name=args.name, device=args.device)
    summary = run_suite(cfg, args.out, resume=args.resume)
    if args.patch:
        from ..patches.artifact import record_evaluation

        rates: dict[str, dict[str, float]] = {}  # the certificate: first judge's plain refusal rate per benchmark
        for v in ("base", "patched"):
            for b, by_attack in summary["results"].get(v, {}).items():
                judges = summary["entries"].get(b, {}).get("judges") or []
                value = by_attack.get("none", {}).get(judges[0], {}).get("refusal_rate") if judges else None
                if value is not None:
                    rates.setdefault(v, {})[b] = value
        record_evaluation(args.patch, {"suite": f"suite:{summary['suite']}", "run_id": summary["run_id"],
                                       "db": summary["db"], "out": str(args.out), "refusal": rates})
    if args.patch:
        who, mode = f"{args.model} + patch {args.patch}", "base vs patched"
    elif args.finetuned:
        who, mode = f"{args.model} vs fine-tuned {args.finetuned}", "base vs fine-tuned ('patched' rows)"
    else:
        who, mode = args.model, "base only"
    print(f"suite {summary['suite']} on {who}: {mode}")
    print(format_table(summary["metrics"], kinds=summary["entries"]))
    for n in summary["notes"]:
        print(f"note: {n}")
    print(f"rows: {Path(args.out) / 'samples.jsonl'}  summary: {Path(args.out) / 'summary.json'}  "
          f"({summary['seconds']:.0f} s)")
    if summary["run_id"] is not None:
        print(f"recorded as run {summary['run_id']} in {summary['db']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evals.refusal import EvalRequest, run_eval

    if args.suite:
        return cmd_eval_suite(args)
    if args.finetuned:
        print("error: --finetuned works with --suite (e.g. --suite quick)", file=sys.stderr)
        return 2
    args.prompts = args.prompts or "builtin:harmful:test"
    args.max_new_tokens = args.max_new_tokens or 64
    args.batch_size = args.batch_size or 16
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    judges = tuple(j.strip() for j in args.judges.split(",") if j.strip())
    req = EvalRequest(model=args.model, patch=args.patch, with_base=args.with_base, prompts=args.prompts,
                      prompt_field=args.prompt_field, judges=judges, generation=gen, limit=args.limit)
    summary = run_eval(req, args.out, resume=args.resume)
    res = summary["results"]
    if args.patch:
        from ..patches.artifact import record_evaluation

        record_evaluation(args.patch, {
            "suite": f"prompts:{args.prompts}", "judges": list(judges), "n": summary["n_prompts"],
            "max_new_tokens": args.max_new_tokens, "out": str(args.out),
            "refusal": {n: {j: res[n][j] for j in judges} for n in ("base", "patched") if n in res}})
    print(f"{summary['n_prompts']} prompts from {args.prompts}; refusal rate by judge:")
    names = [n for n in ("base", "patched") if n in res]
    print("judge".ljust(18) + "".join(n.rjust(10) for n in names) + ("  difference" if "difference" in res else ""))
    for j in judges:
        line = j.ljust(18) + "".join(f"{res[n][j]:>10.1%}" for n in names)
        if "difference" in res:
            line += f"  {res['difference'][j]:+.1%}"
        print(line)
    print(f"rows: {Path(args.out) / 'samples.jsonl'}  summary: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from ..evals.store import ResultsStore

    with ResultsStore(args.db) as store:
        runs = store.runs(limit=args.limit)
        path = store.path
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
        return 0
    if not runs:
        print(f"no runs recorded in {path}")
        return 0
    cols = [("id", 4), ("created", 25), ("suite", 10), ("model", 22), ("patch", 28), ("sha256", 12), ("metrics", 7),
            ("samples", 7), ("name", 20)]
    print("  ".join(c.ljust(w) for c, w in cols))
    for r in runs:
        model = str(r["model_spec"])
        patch = str(r["patch_path"] or "-")
        cells = [str(r["id"]), r["created"], str(r["suite"] or "-"), model[-22:], patch[-28:],
                 (r["patch_sha256"] or "-")[:12], str(r["n_metrics"]), str(r["n_samples"]), str(r["name"] or "-")]
        print("  ".join(c.ljust(w) for c, (_, w) in zip(cells, cols)))
    print(f"({len(runs)} run(s) in {path})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..evals.suite import format_table
    from ..evals.store import ResultsStore, compare_runs

    with ResultsStore(args.db) as store:
        a, b = store.get_run(args.a), store.get_run(args.b)
        rows = compare_runs(store, a["id"], b["id"])
    variants = [args.variant] if args.variant else ["base", "patched", "difference"]
    for r in (a, b):
        print(f"run {r['id']}: {r['created']}  suite {r['suite']}  model {r['model_spec']}  "
              f"patch {r['patch_path'] or '-'}")
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        metrics = [{**{k: r[k] for k in ("benchmark", "attack", "judge", "metric")}, "variant": col, "value": r[key]}
                   for r in mine for col, key in (("a", "a"), ("b", "b"), ("b-a", "difference"))]
        print(f"\n{v}: run {a['id']} (A) vs run {b['id']} (B)")
        print(format_table(metrics, columns=("a", "b", "b-a"),
                           headers=(f"A=run {a['id']}", f"B=run {b['id']}", "B - A")))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..jobs.demo import default_out_dir, format_table, run_demo

    cfg = _train_config(args)
    out = Path(args.out) if args.out else default_out_dir()
    print(f"safetypatch demo: training a safety patch on {cfg.model} (run directory {out})")
    summary = run_demo(out, cfg, eval_limit=args.eval_limit)
    print()
    print(format_table(summary))
    print(f"\npatch: {summary['patch']}\nsummary: {out / 'summary.json'}  (total {summary['total_seconds']:.0f} s)")
    return 0


def cmd_patch_info(args: argparse.Namespace) -> int:
    from ..patches.artifact import patch_info

    info = patch_info(args.patch)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for k, v in info.items():
        if k in ("evaluations", "calibration"):
            continue
        if k == "training" and isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, dict))
        print(f"{k:>17}: {v}")
    evals = info.get("evaluations") or []
    print(f"{'certificate':>17}: " + ("no evaluation recorded" if not evals else f"{len(evals)} evaluation(s)"))
    for e in evals:
        rates = "; ".join(f"{name}: " + ", ".join(f"{j} {v:.1%}" for j, v in by_judge.items())
                          for name, by_judge in e.get("refusal", {}).items())
        print(f"{'':>17}  {e.get('date', '?')}  {e.get('suite', '?')}  n={e.get('n', '?')}  {rates}")
    cal = info.get("calibration")
    if cal:
        budget = f"base benign {cal['base_benign_refusal']:.1%} + budget {cal['budget']:.0%}"
        if cal["within_budget"]:
            at = next(p for p in cal["curve"] if p["factor"] == cal["chosen_factor"])
            line = (f"s = {cal['chosen_factor']:g}: harmful {at['harmful_refusal']:.1%}, benign "
                    f"{at['benign_refusal']:.1%} ({budget})")
        else:
            line = f"no factor within {budget}"
        print(f"{'calibration':>17}: {line}  {cal['date']}")
    return 0


# ------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safetypatch", description="LoRA safety patches: train, evaluate, manage.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a safety patch (LoRA refusal-SFT) or a full fine-tuning baseline")
    t.add_argument("--config", help="YAML recipe; flags override it")
    t.add_argument("--out", required=True, help="run directory (the patch goes to OUT/patch)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    _add_dataclass_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate base and/or patched: a prompt file (--prompts) or a suite (--suite)")
    e.add_argument("--model", default="default", help="hub id, local dir, .gguf file, or 'default'")
    e.add_argument("--patch", help="patch directory to evaluate")
    e.add_argument("--with-base", action="store_true", help="also evaluate the base model (with --patch)")
    e.add_argument("--finetuned", help="with --suite: a fully fine-tuned model directory, evaluated against --model "
                                       "as its base (its rows are labelled 'patched')")
    e.add_argument("--prompts", default=None,
                   help="JSONL with a 'prompt' field, CSV with a 'prompt' column, or builtin:<harmful|benign>:<split> "
                        "(default builtin:harmful:test)")
    e.add_argument("--prompt-field", default="prompt", help="field / column holding the prompt")
    e.add_argument("--out", required=True, help="output directory for samples.jsonl and summary.json")
    e.add_argument("--judges", default="refusal_xstest,refusal_gcg", help="comma-separated judge names")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (a suite: its own setting)")
    e.add_argument("--batch-size", type=int, default=None, help="default 16 (a suite: its own setting)")
    e.add_argument("--limit", type=int, help="evaluate only the first N prompts (a suite: at most N per entry)")
    e.add_argument("--suite", help="evaluation suite: a shipped name (quick, paper) or a YAML file; with --patch, "
                                   "base and patched are both evaluated")
    e.add_argument("--data-root", "--shared", dest="data_root",
                   help="directory of public benchmark files, laid out like ../shared/data (default $SAFETYPATCH_DATA)")
    e.add_argument("--db", help="results database (default $SAFETYPATCH_HOME/results.db)")
    e.add_argument("--no-db", action="store_true", help="do not record the suite run in the results database")
    e.add_argument("--judge-model", action="append", metavar="[JUDGE=]MODEL",
                   help="model for a model-based judge (repeatable); without JUDGE= it serves every model judge")
    e.add_argument("--name", help="run name in the results database (default: the --out directory's name)")
    e.add_argument("--device", help="suite runs: device for the model and judge models, e.g. cuda (default CPU)")
    e.add_argument("--resume", action="store_true", help="allow writing into an existing output directory")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train the default patch on the embedded model and show base vs patched")
    d.add_argument("--out", help="run directory (default runs/demo-<time>); the patch goes to OUT/patch")
    d.add_argument("--config", help="YAML recipe; flags override it")
    d.add_argument("--eval-limit", type=int, help="evaluate only the first N test prompts of each split")
    _add_dataclass_flags(d, TrainConfig)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("runs", help="list the evaluation runs recorded in the results database")
    r.add_argument("--db", help="results database (default $SAFETYPATCH_HOME/results.db)")
    r.add_argument("--limit", type=int, help="only the newest N runs")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_runs)

    c = sub.add_parser("compare", help="the difference table between two recorded runs")
    c.add_argument("a", help="run id (or name) A")
    c.add_argument("b", help="run id (or name) B")
    c.add_argument("--db", help="results database (default $SAFETYPATCH_HOME/results.db)")
    c.add_argument("--variant", choices=("base", "patched", "difference"), help="only this variant's rows")
    c.set_defaults(func=cmd_compare)

    pa = sub.add_parser("patch", help="inspect and manage patches")
    psub = pa.add_subparsers(dest="patch_command", required=True)
    info = psub.add_parser("info", help="recipe, base fingerprint, shape, size, sha256 and evaluation summary")
    info.add_argument("patch")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_patch_info)

    from . import analyze as cli_analyze, calibrate as cli_calibrate, patch as cli_patch
    from ..jobs import chat as interactive, redteam
    from ..patches import projection

    cli_patch.register(psub)
    projection.register(psub)

    cli_analyze.register(sub)
    cli_calibrate.register(sub)
    interactive.register(sub)
    redteam.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import DataError
    from ..errors import OutputExistsError

    import warnings

    # transformers 5 warns about a deprecated attribute that peft still reads; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    known: tuple[type[BaseException], ...] = (ConfigError, DataError, OutputExistsError, FileExistsError)
    try:
        from ..errors import ModelError
        from ..errors import PatchError

        known = known + (ModelError, PatchError)
        return int(args.func(args) or 0)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


def _entry() -> Any:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
