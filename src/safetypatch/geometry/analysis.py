"""The geometry analysis of a patch or a fully fine-tuned model: every update dW against its base weight W0
(`metrics.weight_metrics`, the math is in `metrics.py`) and, optionally, the hidden-state shift it causes.

SVDs of base weights come from `modeling.SVDCache` (cached per model fingerprint under
`safetypatch_home()/svd/`, safetensors only, checked against the weight's sha256 on load).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError, PatchError
from ..modeling import SVDCache, load_model
from ..patches import load_patch
from .metrics import KS, weight_metrics
from .report import write_outputs
from .shift import default_prompts, hidden_shift
from .updates import Key, base_weight, full_updates, patch_updates, weight_name

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def update_records(model: Any, updates: dict[Key, "torch.Tensor"], ks: Sequence[int] = KS, seed: int = 0,
                   cache: SVDCache | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One record per update: layer, module, weight name, shape, and weight_metrics (`progress`: a bar on stderr)."""
    from tqdm.auto import tqdm

    cache = cache or SVDCache(model)
    records = []
    for key in tqdm(sorted(updates), desc="geometry: metrics per module", leave=False,
                    disable=not progress or len(updates) < 2):
        w0 = base_weight(model, key)
        name = weight_name(model, key)
        dw = updates[key]
        if dw.shape != w0.shape:
            raise PatchError(f"{name}: update is {tuple(dw.shape)} but the base weight is {tuple(w0.shape)}")
        metrics = weight_metrics(w0, dw, ks, seed, svd0=cache.get(name, w0))
        records.append({"layer": key[0], "module": key[1], "weight": name, "d_out": w0.shape[0],
                        "d_in": w0.shape[1], **metrics})
    return records


def analyze_with_shift(model_spec: str, patch: str | Path | None = None, finetuned: str | Path | None = None,
                       ks: Sequence[int] = KS, out_dir: str | Path | None = None,
                       prompts_harmful: Sequence[Any] | None = None, prompts_benign: Sequence[Any] | None = None,
                       shift: bool = True, limit: int = 20, seed: int = 0, verify: bool = True,
                       chat_template: str = "auto", progress: bool = True
                       ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """analyze(), also returning the hidden-state shift ({'harmful': [...], 'benign': [...], ...} or None).
    `verify=False` skips the patch's sha256 check (its base fingerprint is still checked); `chat_template` is
    --chat-template (the prompts' format for the shift); `progress`: bars on stderr."""
    if (patch is None) == (finetuned is None):
        raise ConfigError("give exactly one of patch= (a LoRA patch dir) or finetuned= (a fine-tuned model)")
    model, tok = load_model(model_spec, chat_template=chat_template)
    ft = load_model(str(finetuned))[0] if finetuned is not None else None
    updates = patch_updates(model, patch, verify) if patch is not None else full_updates(model, ft)
    if not updates:
        log.warning("no weight differs from the base model; nothing to analyse")
    records = update_records(model, updates, ks, seed, progress=progress)
    shift_res = None
    if shift:
        harmful, benign = default_prompts(limit)
        harmful = list(prompts_harmful) if prompts_harmful is not None else harmful
        benign = list(prompts_benign) if prompts_benign is not None else benign
        if patch is not None:
            target = load_patch(model, patch, verify=False)  # its files and base were checked above
            base = None
        else:
            target, base = ft, model
        shift_res = {"harmful": hidden_shift(target, tok, harmful, base=base, progress=progress,
                                             desc="shift: harmful prompts"),
                     "benign": hidden_shift(target, tok, benign, base=base, progress=progress,
                                            desc="shift: benign prompts"),
                     "n_harmful": len(harmful), "n_benign": len(benign)}
    if out_dir is not None:
        write_outputs(out_dir, records, shift_res, ks)
    return records, shift_res


def analyze(model_spec: str, patch: str | Path | None = None, finetuned: str | Path | None = None,
            ks: Sequence[int] = KS, out_dir: str | Path | None = None, prompts_harmful: Sequence[Any] | None = None,
            prompts_benign: Sequence[Any] | None = None, shift: bool = True, limit: int = 20,
            seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Geometry records for a LoRA patch (`patch`) or a fully fine-tuned model (`finetuned`) on `model_spec`.

    With `out_dir`, writes geometry.json, overlap_heatmap.png and (unless shift=False) shift.json and shift.png.
    Prompts default to the built-in dev splits (`limit` each).
    """
    return analyze_with_shift(model_spec, patch, finetuned, ks, out_dir, prompts_harmful, prompts_benign,
                              shift, limit, seed, progress=progress)[0]
