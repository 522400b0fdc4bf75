"""`safetypatch patch stack | scale | merge (apply) | unmerge | export`: subcommands added to the `patch` group by `register`.

Heavy imports happen inside the command functions so `--help` stays instant. Errors are PatchError (the main CLI
prints `error: ...` and exits 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import PatchError


def parse_weights(text: str | None, n: int) -> list[float]:
    """'1,-1' -> [1.0, -1.0]; None -> all ones; the count must match the number of patches."""
    if text is None:
        return [1.0] * n
    try:
        weights = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PatchError(f"--weights {text!r}: expected comma-separated numbers such as 1,-1 or 0.5,0.5") from None
    if len(weights) != n:
        raise PatchError(f"--weights has {len(weights)} value(s) for {n} patch(es)")
    return weights


def cmd_stack(args: argparse.Namespace) -> int:
    from ..patches.ops import stack_patches

    weights = parse_weights(args.weights, len(args.patches))
    meta = stack_patches(args.patches, weights, args.out, overwrite=args.overwrite)
    parts = " + ".join(f"{w:g} x {Path(p).name}" for p, w in zip(args.patches, weights))
    shape = meta["shape"]
    print(f"stacked {parts} -> {args.out}: rank {shape['rank']}, modules {','.join(shape['target_modules'])}, "
          f"layers {_layers(shape['layers'])}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from ..patches.ops import scale_patch

    scale_patch(args.patch, args.factor, args.out, overwrite=args.overwrite)
    print(f"scaled {args.patch} by {args.factor:g} -> {args.out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from ..patches.ops import apply_patch

    out = apply_patch(args.model, args.patch, args.out, overwrite=args.overwrite)
    print(f"merged {args.patch} into {args.model} -> {out} (load it with from_pretrained; see merged_from.json; "
          "`patch unmerge` restores the base exactly)")
    return 0


def cmd_unmerge(args: argparse.Namespace) -> int:
    from ..patches.ops import unmerge_patch

    out = unmerge_patch(args.model, args.patch, args.out, overwrite=args.overwrite)
    info = json.loads((out / "unmerged_from.json").read_text())
    how = "bit-exact" if info["exact"] else "up to float rounding (no correction file from `patch merge`)"
    match = "matches" if info["fingerprint_matches_patch_base"] else "does NOT match"
    print(f"subtracted {args.patch} from {args.model} -> {out}: restored {how}; its fingerprint {match} the base "
          "the patch was made for (see unmerged_from.json)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..patches.export import export_gguf, export_peft

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


def _layers(layers: Any) -> str:
    return ",".join(map(str, layers)) if isinstance(layers, list) else str(layers)


def register(patch_subparsers: Any) -> None:
    """Add stack / scale / apply / export to the `safetypatch patch` sub-parser group."""
    s = patch_subparsers.add_parser("stack", help="combine patches exactly: dW = sum_i w_i dW_i (ranks concatenated)")
    s.add_argument("patches", nargs="+", metavar="PATCH")
    s.add_argument("-o", "--out", required=True, help="output patch directory")
    s.add_argument("--weights", help="comma-separated weights, one per patch (default all 1); "
                                     "write --weights=-1,1 when the first is negative")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_stack)

    c = patch_subparsers.add_parser("scale", help="multiply a patch's update by a factor")
    c.add_argument("patch")
    c.add_argument("--factor", type=float, required=True, help="e.g. 0.5 for half strength, -1 to invert")
    c.add_argument("-o", "--out", required=True, help="output patch directory")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.set_defaults(func=cmd_scale)

    for name in ("merge", "apply"):
        a = patch_subparsers.add_parser(name, help="merge a patch into its base model and write the merged model"
                                        + (" (same as merge)" if name == "apply" else ""))
        a.add_argument("patch")
        a.add_argument("--model", default="default", help="base model: hub id, local dir, .gguf file, or 'default'")
        a.add_argument("-o", "--out", required=True, help="output model directory (safetensors + tokenizer)")
        a.add_argument("--overwrite", action="store_true", help="replace an existing output")
        a.set_defaults(func=cmd_apply)

    u = patch_subparsers.add_parser("unmerge", help="subtract a patch from a merged model: restores the base weights")
    u.add_argument("patch")
    u.add_argument("--model", required=True, help="the merged model directory")
    u.add_argument("-o", "--out", required=True, help="output model directory for the restored base")
    u.add_argument("--overwrite", action="store_true", help="replace an existing output")
    u.set_defaults(func=cmd_unmerge)

    e = patch_subparsers.add_parser("export", help="export for serving: PEFT adapter (vLLM) or GGUF LoRA (llama.cpp)")
    e.add_argument("patch")
    e.add_argument("--format", choices=("peft", "gguf"), required=True)
    e.add_argument("-o", "--out", required=True, help="output directory (peft) or .gguf file (gguf)")
    e.add_argument("--max-lora-rank", type=int, default=16, help="peft: warn when the rank exceeds vLLM's setting")
    e.add_argument("--arch", default="llama", help="gguf: llama.cpp architecture name (default llama)")
    e.add_argument("--model", help="gguf: base model (for its head counts; default: the spec in patch.json)")
    e.add_argument("--n-head", type=int, help="gguf: attention heads (instead of --model)")
    e.add_argument("--n-head-kv", type=int, help="gguf: key/value heads (default --n-head)")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="gguf: tensor type")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.set_defaults(func=cmd_export)
