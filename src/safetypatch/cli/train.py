"""`safetypatch train` and `safetypatch demo`: the recipe's flags come from TrainConfig (its field help is the flag
help); `--config recipe.yaml` loads a recipe and flags given on the command line override it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..training.config import TrainConfig
from .flags import add_command, add_recipe_flags, recipe_from_args

RECIPE = {"help": "YAML recipe; flags override it"}

HELP_ORDER = 10  # where the command group stands in `safetypatch --help`


@dataclass(kw_only=True)
class TrainArgs:
    """`safetypatch train`'s own flags (the recipe is TrainConfig)."""

    config: str | None = field(default=None, metadata=RECIPE)
    out: str = field(metadata={"required": True, "help": "run directory (the patch goes to OUT/patch)"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in OUT"})
    launch: str | None = field(default=None, metadata={
        "choices": ("ddp", "fsdp", "zero2", "zero3"),
        "help": "run this command under `accelerate launch` with the shipped config: ddp (GPUs, or CPU processes "
                "over gloo), fsdp, zero2 / zero3 (DeepSpeed; GPUs)"})
    num_processes: int | None = field(default=None, metadata={
        "min": 1, "help": "processes for --launch (default: one per GPU)"})


@dataclass
class DemoArgs:
    """`safetypatch demo`'s own flags (the recipe is TrainConfig)."""

    out: str | None = field(default=None, metadata={
        "help": "run directory (default runs/demo-<time>); the patch goes to OUT/patch"})
    config: str | None = field(default=None, metadata=RECIPE)
    eval_limit: int | None = field(default=None, metadata={
        "help": "evaluate only the first N test prompts of each split", "min": 1})


def cmd_train(args: argparse.Namespace) -> int:
    cfg = recipe_from_args(TrainConfig, args, args.config)
    if args.launch:
        from ..jobs.launch import launch

        return launch(args.launch, args.num_processes, cfg, args.argv)
    if args.num_processes is not None:
        from ..errors import ConfigError

        raise ConfigError("--num-processes goes with --launch ENGINE (e.g. --launch ddp --num-processes 2)")
    from ..jobs.train import train

    res = train(cfg, args.out, resume=args.resume)
    if res.rank == 0:
        print(json.dumps({"output": str(res.output_dir), **res.stats}, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..jobs.demo import default_out_dir, format_table, run_demo

    cfg = recipe_from_args(TrainConfig, args, args.config)
    out = Path(args.out) if args.out else default_out_dir()
    print(f"safetypatch demo: training a safety patch on {cfg.model} (run directory {out})")
    summary = run_demo(out, cfg, eval_limit=args.eval_limit)
    print()
    print(format_table(summary))
    print(f"\npatch: {summary['patch']}\nsummary: {out / 'summary.json'}  (total {summary['total_seconds']:.0f} s)")
    return 0


def register_train(sub: Any) -> None:
    t = add_command(sub, "train", "train a safety patch (LoRA refusal-SFT) or a full fine-tuning baseline",
                    cmd_train, TrainArgs)
    add_recipe_flags(t, TrainConfig)


def register_demo(sub: Any) -> None:
    d = add_command(sub, "demo", "train the default patch on the embedded model and show base vs patched",
                    cmd_demo, DemoArgs)
    add_recipe_flags(d, TrainConfig)


def register(sub: Any) -> None:
    register_train(sub)
    register_demo(sub)
