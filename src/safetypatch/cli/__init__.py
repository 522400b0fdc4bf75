"""Command line: `safetypatch train | demo | eval | runs | compare | patch ... | analyze | sweep | report | calibrate |
chat | redteam | gcg`.

One module per command group (train.py: train and demo; evaluate.py: eval, runs, compare; patch.py: the patch
group; analyze.py, sweep.py, report.py, calibrate.py, chat.py, redteam.py, gcg.py); each command's flags are generated
from its config dataclass by flags.py, so every default is written once. A module of this folder that defines
`register(sub)` and `HELP_ORDER` is a command group that `build_parser` finds: a new command is one new module.
Heavy imports happen inside the command functions, so building the parser (and `--help`) is instant. `main`
prints any SafetypatchError as `error: ...` (exit status 2). No parser takes abbreviated flags (`flags.Parser`).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Sequence

from ..errors import SafetypatchError
from .flags import Parser


def command_modules() -> list[ModuleType]:
    """The command-group modules of this package (those with `register` and `HELP_ORDER`), in help order."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    groups = [m for m in modules if hasattr(m, "register") and hasattr(m, "HELP_ORDER")]
    return sorted(groups, key=lambda m: m.HELP_ORDER)


def build_parser() -> argparse.ArgumentParser:
    # a Parser takes no abbreviated flags, and every sub-parser below it is one too
    p = Parser(prog="safetypatch", description="LoRA safety patches: train, evaluate, manage.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # transformers 5 warns about a deprecated attribute that peft still reads; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given (`train --launch` reruns it)
    try:
        return int(args.func(args) or 0)
    except (SafetypatchError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a rank of `train --launch` whose peer stopped first: one line, not a traceback
        from ..training.distributed import peer_failure

        msg = peer_failure(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
