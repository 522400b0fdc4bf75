"""`safetypatch calibrate --patch P`: the strength dial (see calibrate.py). Heavy imports inside the command."""

from __future__ import annotations

import argparse
from typing import Any

from ..data.builtin import DEV_BENIGN, DEV_HARMFUL


def _factors(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--factors expects comma-separated numbers like 0.5,1,1.5, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--factors expects numbers >= 0, got {text!r}")
    return vals


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..jobs.calibrate import CalibrationConfig, calibrate

    cfg = CalibrationConfig(max_over_refusal=args.max_over_refusal, dev_harmful=args.dev_harmful,
                            dev_benign=args.dev_benign, max_new_tokens=args.max_new_tokens)
    if args.factors:
        cfg.factors = args.factors
    apply_to = args.apply_out or (f"{str(args.patch).rstrip('/')}-calibrated" if args.apply else None)
    rec = calibrate(args.patch, args.model, cfg, out_dir=args.out, apply_to=apply_to, overwrite=args.overwrite)
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


def register(sub: Any) -> None:
    c = sub.add_parser("calibrate", help="sweep a patch's strength on dev prompts; pick the strongest within an "
                                         "over-refusal budget")
    c.add_argument("--patch", required=True)
    c.add_argument("--model", default="default", help="base model: hub id, local dir, .gguf file, or 'default'")
    c.add_argument("--max-over-refusal", type=float, default=0.05,
                   help="benign refusal allowed above the base model's (default 0.05)")
    c.add_argument("--factors", type=_factors, help="scale factors to try (default 0,0.25,...,1.5)")
    c.add_argument("--dev-harmful", default=DEV_HARMFUL)
    c.add_argument("--dev-benign", default=DEV_BENIGN)
    c.add_argument("--max-new-tokens", type=int, default=24)
    c.add_argument("--out", help="directory for calibration.json and calibration.png")
    c.add_argument("--apply", action="store_true",
                   help="also write the patch scaled by the chosen factor, to PATCH-calibrated (or -o)")
    c.add_argument("-o", "--apply-out", metavar="DIR", help="where --apply writes the scaled patch (implies --apply)")
    c.add_argument("--overwrite", action="store_true", help="replace existing calibration outputs")
    c.set_defaults(func=cmd_calibrate)
