"""`safetypatch redteam --patch P`: red-teaming rounds (see jobs/redteam.py). The rounds' flags come from
`RedteamConfig`, the command's own from `RedteamArgs`; heavy imports happen inside the command."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ..config import MODEL_HELP
from ..jobs.redteam import RedteamConfig
from .flags import add_command, config_from_args

HELP_ORDER = 70  # where the command group stands in `safetypatch --help`


@dataclass(kw_only=True)
class RedteamArgs:
    patch: str = field(metadata={"required": True, "help": "the starting patch"})
    pool: str = field(default="builtin:harmful:dev", metadata={
        "help": "harmful prompts to red-team with (JSONL/CSV with 'prompt' and optional 'response' = the refusal to "
                "train, or builtin:...); every 3rd is held out for evaluation"})
    model: str = field(default="default", metadata={"help": MODEL_HELP})
    out: str = field(metadata={"required": True,
                               "help": "directory for the rounds (rerun the same command to resume)"})
    epochs: float | None = field(default=None, metadata={
        "help": "epochs for each round's patch (default: RedteamConfig.train's)", "gt": 0})


def parse_attacks(text: str) -> tuple[str, ...]:
    """'prefix_injection,aim' -> ('none', 'prefix_injection', 'aim'): the plain prompts always come first."""
    return tuple(dict.fromkeys(["none"] + [a.strip() for a in text.split(",") if a.strip()]))


def cmd_redteam(args: argparse.Namespace) -> int:
    from ..data.builtin import resolve_prompts
    from ..jobs.redteam import format_table, run_redteam

    cfg = config_from_args(RedteamConfig, args)
    if args.epochs is not None:
        cfg.train = {**cfg.train, "epochs": args.epochs}
    pool = resolve_prompts(args.pool, default_split="dev")
    print(format_table(run_redteam(args.patch, pool, args.out, args.model, cfg)))
    print(f"rounds: {args.out}/redteam.json")
    return 0


def register(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "redteam", "red-team a patch in rounds: find failures (plain and jailbreak-wrapped), "
                       "train a patch on them with earlier ones frozen, stack, evaluate", cmd_redteam, RedteamArgs,
                       RedteamConfig, converters={"attacks": parse_attacks}, skip=("train",))
