"""`safetypatch sweep SWEEP --out DIR [--quick] [--dry-run] [--jobs N] [--only P,Q]`: the papers' ablations (rank,
target modules, layers, LoRA vs full fine-tuning, data ratio) as one command; flags come from
`jobs.sweep.SweepConfig`."""

from __future__ import annotations

import argparse
from typing import Any

from ..jobs.sweep_spec import SweepConfig
from .flags import add_command, config_from_args

HELP_ORDER = 44  # where the command group stands in `safetypatch --help`


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..jobs.sweep import run_sweep

    print(run_sweep(config_from_args(SweepConfig, args)))
    return 0


def register(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "sweep", "train, evaluate and analyse every point of a sweep over recipe keys "
                       "(shipped: rank, modules, layers, lora_vs_full, data_ratio)", cmd_sweep, SweepConfig)
