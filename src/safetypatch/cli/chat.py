"""`safetypatch chat [--patch P]`: flags from `jobs.chat.ChatConfig`; the model loads inside the command."""

from __future__ import annotations

import argparse
from typing import Any

from ..jobs.chat import ChatConfig
from .flags import add_command, config_from_args

HELP_ORDER = 60  # where the command group stands in `safetypatch --help`


def cmd_chat(args: argparse.Namespace) -> int:
    from ..jobs.chat import run_chat

    return run_chat(config_from_args(ChatConfig, args))


def register(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "chat", "ask questions; with --patch, see base and patched answers side by side",
                       cmd_chat, ChatConfig)
