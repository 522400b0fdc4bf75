"""`safetypatch eval | runs | compare`: evaluate (a prompt file or a suite), list the recorded runs, and compare two.

`eval`'s flags come from `jobs.evaluate.EvalConfig`, `runs`' and `compare`'s from the small dataclasses below.
Heavy imports happen inside the command functions so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from ..jobs.evaluate import EvalConfig
from .flags import add_command, config_from_args

DB_HELP = "results database (default $SAFETYPATCH_HOME/results.db)"
RUN_COLUMNS = (("id", 4), ("created", 25), ("suite", 10), ("model", 22), ("patch", 28), ("sha256", 12),
               ("metrics", 7), ("samples", 7), ("name", 20))

HELP_ORDER = 20  # where the command group stands in `safetypatch --help`


@dataclass
class RunsArgs:
    db: str | None = field(default=None, metadata={"help": DB_HELP})
    limit: int | None = field(default=None, metadata={"help": "only the newest N runs", "min": 1})
    json: bool = False


@dataclass(kw_only=True)
class CompareArgs:
    a: str = field(metadata={"positional": True, "help": "run id (or name) A"})
    b: str = field(metadata={"positional": True, "help": "run id (or name) B"})
    db: str | None = field(default=None, metadata={"help": DB_HELP})
    variant: str | None = field(default=None, metadata={"choices": ("base", "patched", "difference"),
                                                        "help": "only this variant's rows"})


def cmd_eval(args: argparse.Namespace) -> int:
    from ..jobs.evaluate import evaluate

    print(evaluate(config_from_args(EvalConfig, args)), end="")
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
    print(_run_line([c for c, _ in RUN_COLUMNS]))
    for r in runs:
        print(_run_line([str(r["id"]), r["created"], str(r["suite"] or "-"), str(r["model_spec"])[-22:],
                         str(r["patch_path"] or "-")[-28:], (r["patch_sha256"] or "-")[:12], str(r["n_metrics"]),
                         str(r["n_samples"]), str(r["name"] or "-")]))
    print(f"({len(runs)} run(s) in {path})")
    return 0


def _run_line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, RUN_COLUMNS))


def cmd_compare(args: argparse.Namespace) -> int:
    from ..evals.store import ResultsStore, compare_runs
    from ..evals.suite import format_table

    with ResultsStore(args.db) as store:
        a, b = store.get_run(args.a), store.get_run(args.b)
        rows = compare_runs(store, a["id"], b["id"])
    for r in (a, b):
        print(f"run {r['id']}: {r['created']}  suite {r['suite']}  model {r['model_spec']}  "
              f"patch {r['patch_path'] or '-'}")
    for v in [args.variant] if args.variant else ["base", "patched", "difference"]:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        metrics = [{**{k: r[k] for k in ("benchmark", "attack", "judge", "metric")}, "variant": col, "value": r[key]}
                   for r in mine for col, key in (("a", "a"), ("b", "b"), ("b-a", "difference"))]
        print(f"\n{v}: run {a['id']} (A) vs run {b['id']} (B)")
        print(format_table(metrics, columns=("a", "b", "b-a"),
                           headers=(f"A=run {a['id']}", f"B=run {b['id']}", "B - A")))
    return 0


def register_eval(sub: Any) -> None:
    add_command(sub, "eval", "evaluate base and/or patched: a prompt file (--prompts) or a suite (--suite)",
                cmd_eval, EvalConfig)


def register_runs(sub: Any) -> None:
    add_command(sub, "runs", "list the evaluation runs recorded in the results database", cmd_runs, RunsArgs)


def register_compare(sub: Any) -> None:
    add_command(sub, "compare", "the difference table between two recorded runs", cmd_compare, CompareArgs)


def register(sub: Any) -> None:
    register_eval(sub)
    register_runs(sub)
    register_compare(sub)
