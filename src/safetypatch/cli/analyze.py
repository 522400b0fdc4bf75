"""`safetypatch analyze`: the geometry of a patch (or a full fine-tune) relative to its base model. Flags come from
`jobs.analyze.AnalyzeConfig`; heavy imports happen inside the job so `--help` stays instant."""

from __future__ import annotations

import argparse
from typing import Any

from ..jobs.analyze import AnalyzeConfig
from .flags import add_command, config_from_args

HELP_ORDER = 40  # where the command group stands in `safetypatch --help`


def parse_ks(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32): subspace sizes, each >= 1."""
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects comma-separated integers like 1,8,32, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"--k expects integers >= 1, got {text!r}")
    return ks


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..jobs.analyze import run_analyze

    print(run_analyze(config_from_args(AnalyzeConfig, args)))
    return 0


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `analyze` command to an argparse subparsers object."""
    return add_command(sub, "analyze", "geometry of a patch: update size, overlap with the base weights' top singular "
                       "subspaces vs chance, hidden-state shift", cmd_analyze, AnalyzeConfig,
                       converters={"k": parse_ks})
