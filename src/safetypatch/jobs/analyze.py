"""The analyze job (`safetypatch analyze`): the geometry of a patch (or a full fine-tune) relative to its base
model, as the text the command prints.

    safetypatch analyze --model M (--patch P | --finetuned DIR) [--k 1,8,32] [--out DIR] [--no-shift]

dW is a LoRA patch's alpha/r B A or a fine-tune's W_ft - W0; `geometry.analyze_with_shift` measures its size and
its overlap with W0's top singular subspaces against chance, and the hidden-state shift at the last prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..geometry import KS


@dataclass(kw_only=True)
class AnalyzeConfig:
    model: str = field(default="default", metadata={
        "help": "base model: hub id, local dir, .gguf file, or 'default'"})
    patch: str | None = field(default=None, metadata={
        "one_of": "update", "help": "LoRA patch directory (dW = alpha/r B A)"})
    finetuned: str | None = field(default=None, metadata={
        "one_of": "update", "help": "fully fine-tuned model directory (dW = W_ft - W0)"})
    k: tuple[int, ...] = field(default=KS, metadata={"help": "subspace sizes, comma separated"})
    out: str | None = field(default=None, metadata={
        "help": "write geometry.json, shift.json and the plots into this directory"})
    no_shift: bool = field(default=False, metadata={"help": "skip the hidden-state shift (no forward passes)"})
    limit: int = field(default=20, metadata={"help": "prompts per side for the shift (built-in dev splits)"})


def run_analyze(cfg: AnalyzeConfig) -> str:
    """Analyse (writing into `cfg.out` when given) and return the report: the per-module table, the shift per layer."""
    from ..geometry import analyze_with_shift

    records, shift = analyze_with_shift(cfg.model, patch=cfg.patch, finetuned=cfg.finetuned, ks=cfg.k,
                                        out_dir=cfg.out, shift=not cfg.no_shift, limit=cfg.limit)
    return format_report(records, shift, cfg.out)


def format_report(records: list[dict[str, Any]], shift: dict[str, Any] | None, out: str | None) -> str:
    """The geometry table, the hidden-state shift per layer (when measured) and the files written (when `out`)."""
    from ..geometry import format_table

    lines = [format_table(records)]
    if shift is not None:
        lines += ["\nhidden-state shift ||h_patched - h_base|| / ||h_base|| at the last prompt token, per layer:",
                  "layer   benign  harmful"]
        lines += [f"{i:>5} {b:>8.4f} {h:>8.4f}" for i, (b, h) in enumerate(zip(shift["benign"], shift["harmful"]))]
    if out:
        lines.append(f"\nwritten: {out}/geometry.json, overlap_heatmap.png"
                     + (", shift.json, shift.png" if shift is not None else ""))
    return "\n".join(lines)
