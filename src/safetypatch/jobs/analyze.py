"""The analyze job (`safetypatch analyze`): the geometry of a patch (or a full fine-tune) relative to its base
model, as the text the command prints.

    safetypatch analyze --model M (--patch P | --finetuned DIR) [--k 1,8,32] [--out DIR [--overwrite]] [--no-shift]

dW is a LoRA patch's alpha/r B A or a fine-tune's W_ft - W0; `geometry.analyze_with_shift` measures its size and
its overlap with W0's top singular subspaces against chance, and the hidden-state shift at the last prompt token.
A safetypatch patch is verified (sha256, safetensors only, finite weights) before the model is loaded; `--out` is
written like every directory output (`io_utils.staged_dir`: complete or absent, an existing one kept unless
`--overwrite`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MODEL_HELP, check_config
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice
from ..geometry import KS


@dataclass(kw_only=True)
class AnalyzeConfig:
    model: str = field(default="default", metadata={
        "help": "base model: " + MODEL_HELP})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)
    patch: str | None = field(default=None, metadata={
        "one_of": "update", "help": "LoRA patch directory (dW = alpha/r B A)"})
    finetuned: str | None = field(default=None, metadata={
        "one_of": "update", "help": "fully fine-tuned model directory (dW = W_ft - W0)"})
    k: tuple[int, ...] = field(default=KS, metadata={"help": "subspace sizes, comma separated", "min": 1})
    out: str | None = field(default=None, metadata={
        "help": "write geometry.json, shift.json and the plots into this directory"})
    no_shift: bool = field(default=False, metadata={"help": "skip the hidden-state shift (no forward passes)"})
    limit: int = field(default=20, metadata={"help": "prompts per side for the shift (built-in dev splits)",
                                             "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out directory"})
    no_verify: bool = field(default=False, metadata={
        "help": "skip the patch's sha256 check (the report then says it is not verified)"})

    def validate(self, where: str = "config") -> None:
        check_choice(self.chat_template, where=where)


def run_analyze(cfg: AnalyzeConfig) -> str:
    """Analyse (writing into `cfg.out` when given) and return the report: the per-module table, the shift per layer."""
    import contextlib

    from ..geometry import analyze_with_shift
    from ..io_utils import staged_dir
    from ..modeling import resolve_model
    from ..patches import PATCH_META, verify_files

    check_config(cfg, "analyze")
    resolve_model(cfg.model)  # a missing model or fine-tuned directory is named before anything loads
    if cfg.finetuned is not None:
        resolve_model(cfg.finetuned, "--finetuned")
    if cfg.patch is not None and (Path(cfg.patch) / PATCH_META).exists() and not cfg.no_verify:
        verify_files(cfg.patch)  # a damaged or edited patch fails before the model is loaded
    with staged_dir(cfg.out, cfg.overwrite) if cfg.out else contextlib.nullcontext() as out:
        records, shift = analyze_with_shift(cfg.model, patch=cfg.patch, finetuned=cfg.finetuned, ks=cfg.k,
                                            out_dir=out, shift=not cfg.no_shift, limit=cfg.limit,
                                            verify=not cfg.no_verify, chat_template=cfg.chat_template)
    report = format_report(records, shift, cfg.out)
    if cfg.patch is not None and cfg.no_verify:
        report += f"\nnote: {cfg.patch} was NOT verified (--no-verify): its weights' sha256 was not checked"
    return report


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
