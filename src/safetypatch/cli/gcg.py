"""`safetypatch gcg --patch P`: GCG adversarial suffixes (nanogcg) against the base and the patched model, and the
base model's suffixes transferred to the patched one (see jobs/gcg.py). Flags come from `GcgRunConfig`; heavy
imports happen inside the command."""

from __future__ import annotations

import argparse
from typing import Any

from ..jobs.gcg import GcgRunConfig
from .flags import add_command, config_from_args

HELP_ORDER = 75  # where the command group stands in `safetypatch --help`


def cmd_gcg(args: argparse.Namespace) -> int:
    from ..evals.gcg import format_table
    from ..jobs.gcg import run_gcg

    cfg = config_from_args(GcgRunConfig, args)
    print(format_table(run_gcg(cfg)))
    print(f"rows: {cfg.out}/gcg.jsonl  summary: {cfg.out}/summary.json")
    return 0


def register(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "gcg", "GCG attack (nanogcg) on the base and the patched model, and base suffixes "
                       "transferred to the patched model: attack success rates", cmd_gcg, GcgRunConfig)
