"""`safetypatch analyze`: the geometry of a patch (or a full fine-tune) relative to its base model.

    safetypatch analyze --model M (--patch P | --finetuned DIR) [--k 1,8,32] [--out DIR] [--no-shift]

Heavy imports happen inside the command so `--help` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Any


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects comma-separated integers like 1,8,32, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"--k expects integers >= 1, got {text!r}")
    return ks


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..geometry.analysis import analyze_with_shift, format_table

    records, shift = analyze_with_shift(args.model, patch=args.patch, finetuned=args.finetuned, ks=args.k,
                                        out_dir=args.out, shift=not args.no_shift, limit=args.limit)
    print(format_table(records))
    if shift is not None:
        print("\nhidden-state shift ||h_patched - h_base|| / ||h_base|| at the last prompt token, per layer:")
        print("layer   benign  harmful")
        for i, (b, h) in enumerate(zip(shift["benign"], shift["harmful"])):
            print(f"{i:>5} {b:>8.4f} {h:>8.4f}")
    if args.out:
        print(f"\nwritten: {args.out}/geometry.json, overlap_heatmap.png"
              + (", shift.json, shift.png" if shift is not None else ""))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `analyze` command to an argparse subparsers object."""
    a = subparsers.add_parser("analyze", help="geometry of a patch: update size, overlap with the base weights' "
                                               "top singular subspaces vs chance, hidden-state shift")
    a.add_argument("--model", default="default", help="base model: hub id, local dir, .gguf file, or 'default'")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--patch", help="LoRA patch directory (dW = alpha/r B A)")
    what.add_argument("--finetuned", help="fully fine-tuned model directory (dW = W_ft - W0)")
    a.add_argument("--k", type=_ks, default=(1, 8, 32), help="subspace sizes, comma separated (default: 1,8,32)")
    a.add_argument("--out", help="write geometry.json, shift.json and the plots into this directory")
    a.add_argument("--no-shift", action="store_true", help="skip the hidden-state shift (no forward passes)")
    a.add_argument("--limit", type=int, default=20, help="prompts per side for the shift (built-in dev splits)")
    a.set_defaults(func=cmd_analyze)
    return a
