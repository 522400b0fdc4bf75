"""`safetypatch patch info | stack | scale | merge (apply) | unmerge | export | project`: the `patch` command group.

Each sub-command's flags come from its small dataclass below. Heavy imports happen inside the command functions so
`--help` stays instant. Errors are PatchError (the main CLI prints `error: ...` and exits 2).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MODEL_HELP
from ..errors import PatchError
from ..patches import SIDES
from .flags import add_command

BASE_MODEL_HELP = "base model: " + MODEL_HELP

HELP_ORDER = 30  # where the command group stands in `safetypatch --help`


def _patch() -> Any:
    return field(metadata={"positional": True})


def _out(help: str) -> Any:
    return field(metadata={"flags": ("-o", "--out"), "required": True, "help": help})


def _overwrite(help: str | None = "replace an existing output") -> Any:
    return field(default=False, metadata={"help": help} if help else {})


@dataclass(kw_only=True)
class InfoArgs:
    patch: str = _patch()
    json: bool = False
    no_verify: bool = field(default=False, metadata={
        "help": "skip the sha256 / safetensors / finite-weights check (the output says it was skipped)"})


@dataclass(kw_only=True)
class StackArgs:
    patches: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "PATCH"})
    out: str = _out("output patch directory")
    weights: str | None = field(default=None, metadata={
        "help": "comma-separated weights, one per patch (default all 1); write --weights=-1,1 when the first is "
                "negative"})
    overwrite: bool = _overwrite()


@dataclass(kw_only=True)
class PatchOpArgs:
    """A patch in, a new directory out (replaced only with --overwrite); sub-classes add their own flags."""

    patch: str = _patch()
    out: str = _out("output patch directory")
    overwrite: bool = _overwrite()


@dataclass(kw_only=True)
class ScaleArgs(PatchOpArgs):
    factor: float = field(metadata={"required": True, "help": "e.g. 0.5 for half strength, -1 to invert"})


@dataclass(kw_only=True)
class MergeArgs(PatchOpArgs):
    out: str = _out("output model directory (safetensors + tokenizer)")
    model: str = field(default="default", metadata={"help": BASE_MODEL_HELP})


@dataclass(kw_only=True)
class UnmergeArgs(PatchOpArgs):
    out: str = _out("output model directory for the restored base")
    model: str = field(metadata={"required": True, "help": "the merged model directory"})


@dataclass(kw_only=True)
class ExportArgs(PatchOpArgs):
    out: str = _out("output directory (peft) or .gguf file (gguf)")
    format: str = field(metadata={"required": True, "choices": ("peft", "gguf")})
    max_lora_rank: int = field(default=16, metadata={"help": "peft: warn when the rank exceeds vLLM's setting",
                                                     "min": 1})
    arch: str | None = field(default=None, metadata={
        "help": "gguf: llama.cpp architecture name (default: the one llama.cpp uses for the base model's type)"})
    model: str | None = field(default=None, metadata={
        "help": "gguf: base model (for its head counts; default: the spec in patch.json)"})
    n_head: int | None = field(default=None, metadata={"help": "gguf: attention heads (instead of --model)", "min": 1})
    n_head_kv: int | None = field(default=None, metadata={"help": "gguf: key/value heads (default --n-head)",
                                                          "min": 1})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float16"), "help": "gguf: tensor type"})


@dataclass(kw_only=True)
class ProjectArgs(PatchOpArgs):
    overwrite: bool = _overwrite(None)
    model: str = field(default="default", metadata={"help": BASE_MODEL_HELP})
    k: int = field(default=16, metadata={"help": "size of the protected top-k subspace", "min": 1})
    side: str = field(default="both", metadata={"choices": SIDES})


def parse_weights(text: str | None, n: int) -> list[float]:
    """'1,-1' -> [1.0, -1.0]; None -> all ones; each finite; the count must match the number of patches."""
    if text is None:
        return [1.0] * n
    try:
        weights = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PatchError(f"--weights {text!r}: expected comma-separated numbers such as 1,-1 or 0.5,0.5") from None
    if not all(math.isfinite(w) for w in weights):
        raise PatchError(f"--weights {text!r}: every weight must be a finite number (not nan or inf)")
    if len(weights) != n:
        raise PatchError(f"--weights has {len(weights)} value(s) for {n} patch(es)")
    return weights


# ------------------------------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    from ..patches import patch_info

    info = patch_info(args.patch, verify=False) if args.no_verify else patch_info(args.patch)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for k, v in info.items():
        if k in ("evaluations", "calibration", "verified", "resolved_modules"):
            continue
        if k == "modules":
            v = modules_text(v, info.get("resolved_modules"))
        if k == "training" and isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, dict))
        if k == "sha256" and not info["verified"]:
            v = f"{v}  (NOT verified: --no-verify; the weights may not match it)"
        print(f"{k:>17}: {v}")
    print_certificate(info.get("evaluations") or [], info.get("calibration"))
    return 0


def modules_text(requested: Any, resolved: Any) -> str:
    """`mlp.up -> up_proj; attn.o -> attn.c_proj`: each requested target and the module names it resolved to
    (patch.json's shape; a patch from before roles records the requested names only)."""
    if not isinstance(requested, list):
        return str(requested)
    resolved = resolved if isinstance(resolved, dict) else {}
    parts = []
    for t in requested:
        names = resolved.get(t)
        parts.append(t if not names or names == [t] else f"{t} -> {', '.join(names)}")
    return "; ".join(parts)


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def print_certificate(evals: list[dict[str, Any]], cal: dict[str, Any] | None) -> None:
    """The evaluations and the calibration recorded in patch.json, as `patch info` shows them."""
    print(f"{'certificate':>17}: " + ("no evaluation recorded" if not evals else f"{len(evals)} evaluation(s)"))
    for e in evals:
        rates = "; ".join(f"{name}: " + ", ".join(f"{j} {_pct(v)}" for j, v in by_judge.items())
                          for name, by_judge in e.get("refusal", {}).items())
        size = f"  n={e['n']}" if "n" in e else ""  # a suite record has one n per benchmark, in its report
        rates = rates or f"no refusal rate recorded (the report: {e.get('out', '?')})"
        print(f"{'':>17}  {e.get('date', '?')}  {e.get('suite', '?')}{size}  {rates}")
    if cal:
        budget = f"base benign {cal['base_benign_refusal']:.1%} + budget {cal['budget']:.0%}"
        at = next((p for p in cal["curve"] if p["factor"] == cal["chosen_factor"]), None)
        if cal["within_budget"] and at is not None:
            line = (f"s = {cal['chosen_factor']:g}: harmful {at['harmful_refusal']:.1%}, benign "
                    f"{at['benign_refusal']:.1%} ({budget})")
        elif cal["within_budget"]:
            line = f"s = {cal['chosen_factor']:g} (not on the recorded curve) ({budget})"
        else:
            line = f"no factor within {budget}"
        print(f"{'calibration':>17}: {line}  {cal['date']}")


def cmd_stack(args: argparse.Namespace) -> int:
    from ..patches import stack_patches

    weights = parse_weights(args.weights, len(args.patches))
    meta = stack_patches(args.patches, weights, args.out, overwrite=args.overwrite)
    parts = " + ".join(f"{w:g} x {Path(p).name}" for p, w in zip(args.patches, weights))
    shape = meta["shape"]
    layers = ",".join(map(str, shape["layers"])) if isinstance(shape["layers"], list) else str(shape["layers"])
    print(f"stacked {parts} -> {args.out}: rank {shape['rank']}, modules {','.join(shape['target_modules'])}, "
          f"layers {layers}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from ..patches import scale_patch

    scale_patch(args.patch, args.factor, args.out, overwrite=args.overwrite)
    print(f"scaled {args.patch} by {args.factor:g} -> {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..patches import apply_patch

    out = apply_patch(args.model, args.patch, args.out, overwrite=args.overwrite)
    print(f"merged {args.patch} into {args.model} -> {out} (load it with from_pretrained; see merged_from.json; "
          "`patch unmerge` restores the base exactly)")
    return 0


def cmd_unmerge(args: argparse.Namespace) -> int:
    from ..patches import unmerge_patch

    out = unmerge_patch(args.model, args.patch, args.out, overwrite=args.overwrite)
    info = json.loads((out / "unmerged_from.json").read_text())
    how = "bit-exact" if info["exact"] else "up to float rounding (no correction file from `patch merge`)"
    match = "matches" if info["fingerprint_matches_patch_base"] else "does NOT match"
    print(f"subtracted {args.patch} from {args.model} -> {out}: restored {how}; its fingerprint {match} the base "
          "the patch was made for (see unmerged_from.json)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..patches import export_gguf, export_peft

    if args.format == "peft":
        warnings = export_peft(args.patch, args.out, max_lora_rank=args.max_lora_rank, overwrite=args.overwrite)
        how = f"vllm serve MODEL --enable-lora --lora-modules patch={args.out}"
    else:
        warnings = export_gguf(args.patch, args.out, arch=args.arch, model=args.model, n_head=args.n_head,
                               n_head_kv=args.n_head_kv, dtype=args.dtype, overwrite=args.overwrite)
        how = f"llama-cli -m MODEL.gguf --lora {args.out}"
    for w in warnings:
        print(f"warning: {w}")
    print(f"exported {args.patch} as {args.format} -> {args.out}  (use: {how})")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from ..patches import project_patch

    meta = project_patch(args.patch, args.model, args.k, args.out, side=args.side, overwrite=args.overwrite)
    d = meta["derived_from"]
    print(f"projected {args.patch} off the top-{d['k']} {d['side']} subspace(s) -> {args.out}: "
          f"kept {d['retained_energy']:.1%} of the update's energy")
    return 0


# ------------------------------------------------------------------------------------------------- parser
MERGE_HELP = "merge a patch into its base model and write the merged model"
COMMANDS: tuple[tuple[str, str, Any, type], ...] = (
    ("info", "recipe, base fingerprint, shape, size, sha256 and evaluation summary", cmd_info, InfoArgs),
    ("stack", "combine patches exactly: dW = sum_i w_i dW_i (ranks concatenated)", cmd_stack, StackArgs),
    ("scale", "multiply a patch's update by a factor", cmd_scale, ScaleArgs),
    ("merge", MERGE_HELP, cmd_merge, MergeArgs),
    ("apply", MERGE_HELP + " (same as merge)", cmd_merge, MergeArgs),
    ("unmerge", "subtract a patch from a merged model: restores the base weights", cmd_unmerge, UnmergeArgs),
    ("export", "export for serving: PEFT adapter (vLLM) or GGUF LoRA (llama.cpp)", cmd_export, ExportArgs),
    ("project", "remove the part of a patch inside the base weights' top-k singular subspace (orthogonal "
                "projection, refactored to rank r)", cmd_project, ProjectArgs),
)


def register(sub: Any) -> None:
    """The `patch` group and its sub-commands."""
    group = sub.add_parser("patch", help="inspect and manage patches")
    psub = group.add_subparsers(dest="patch_command", required=True)
    for name, help, func, args in COMMANDS:
        add_command(psub, name, help, func, args)
