"""`safetypatch report`: one self-contained HTML page over demo runs, sweeps and suite evals. Flags come from
`jobs.report.ReportConfig`; matplotlib loads inside the job so `--help` stays instant."""

from __future__ import annotations

import argparse
from typing import Any

from ..jobs.report import ReportConfig
from .flags import add_command, config_from_args

HELP_ORDER = 45  # where the command group stands in `safetypatch --help`


def cmd_report(args: argparse.Namespace) -> int:
    from ..jobs.report import run_report

    print(run_report(config_from_args(ReportConfig, args)))
    return 0


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `report` command to an argparse subparsers object."""
    return add_command(sub, "report", "one self-contained HTML page over runs and sweeps: the safety / over-refusal "
                       "/ utility frontier, ablations, geometry, the strength dial, refusal per category, the runs "
                       "table", cmd_report, ReportConfig)
