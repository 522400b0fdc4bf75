"""`safetypatch calibrate --patch P`: the strength dial (see jobs/calibrate.py). The sweep's flags come from
`CalibrationConfig`, the command's own from `CalibrateArgs`; heavy imports happen inside the command."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ..config import MODEL_HELP
from ..jobs.calibrate import CalibrationConfig
from .flags import add_command, config_from_args

HELP_ORDER = 50  # where the command group stands in `safetypatch --help`


@dataclass(kw_only=True)
class CalibrateArgs:
    patch: str = field(metadata={"required": True})
    model: str = field(default="default", metadata={
        "help": "base model: " + MODEL_HELP})
    out: str | None = field(default=None, metadata={"help": "directory for calibration.json and calibration.png"})
    apply: bool = field(default=False, metadata={
        "help": "also write the patch scaled by the chosen factor, to PATCH-calibrated (or -o)"})
    apply_out: str | None = field(default=None, metadata={
        "flags": ("-o", "--apply-out"), "metavar": "DIR",
        "help": "where --apply writes the scaled patch (implies --apply)"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing calibration outputs"})


def parse_factors(text: str) -> tuple[float, ...]:
    """'0.5,1,1.5' -> (0.5, 1.0, 1.5): scale factors (their range, each finite and >= 0, is CalibrationConfig's)."""
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--factors expects comma-separated numbers like 0.5,1,1.5, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"--factors expects numbers >= 0, got {text!r}")
    return vals


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..jobs.calibrate import calibrate

    apply_to = args.apply_out or (f"{str(args.patch).rstrip('/')}-calibrated" if args.apply else None)
    rec = calibrate(args.patch, args.model, config_from_args(CalibrationConfig, args), out_dir=args.out,
                    apply_to=apply_to, overwrite=args.overwrite)
    print("   s   harmful   benign")
    for p in rec["curve"]:
        mark = "  <- chosen" if p["factor"] == rec["chosen_factor"] and rec["within_budget"] else ""
        print(f"{p['factor']:>4g}   {p['harmful_refusal']:>7.1%}   {p['benign_refusal']:>6.1%}{mark}")
    if not rec["within_budget"]:
        print(f"no factor keeps benign refusal within {rec['budget']:.0%} of the base model's "
              f"({rec['base_benign_refusal']:.1%}); the patch needs retraining, not a dial"
              + ("; no scaled patch written" if apply_to else ""))
        return 1
    print(f"chosen s = {rec['chosen_factor']:g} (recorded in {args.patch}/patch.json"
          + (f"; curve in {args.out}/calibration.png" if args.out else "") + ")")
    if apply_to:
        print(f"wrote the patch scaled by {rec['chosen_factor']:g} to {apply_to}")
    return 0


def register(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "calibrate", "sweep a patch's strength on dev prompts; pick the strongest within an "
                       "over-refusal budget", cmd_calibrate, CalibrateArgs, CalibrationConfig,
                       converters={"factors": parse_factors})
