"""Contrastive initialisation of a patch's LoRA A: start each patched module's input direction on "harmful vs benign".

PEFT initialises A at random and B at zero, so early in training B learns *what* to output (a refusal) while A still
reads an arbitrary input direction: the refusal then fires on benign prompts too. Here row 0 of every A is set to
the difference of the module's mean input on harmful and on benign prompts (at the last prompt tokens, where the
model decides how to answer), made orthogonal to the benign mean so that benign inputs project to about zero.
This is the diff-of-means direction of the refusal-direction literature (Arditi et al. 2024), used as a detector
inside the patch rather than as a steering vector. B stays zero, so the patched model still starts equal to the base.
"""

from __future__ import annotations

from typing import Any

from .data.chat import prompt_ids
from .data.readers import Record


def _lora_modules(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def mean_inputs(model: Any, tok: Any, records: list[Record], modules: dict[str, Any], tail: int = 5,
                batch_size: int = 16) -> dict[str, Any]:
    """Mean input of each module over the last `tail` prompt tokens (left-padded batches, adapter off)."""
    import torch

    sums: dict[str, Any] = {}
    count = 0
    hooks = []

    def make_hook(name: str):
        def hook(_mod: Any, args: tuple) -> None:
            x = args[0][:, -tail:, :].detach().float()
            sums[name] = sums.get(name, 0) + x.sum(dim=(0, 1))
        return hook

    for name, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    device = next(model.parameters()).device
    try:
        encoded = [prompt_ids(tok, r.chat()) for r in records]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i: i + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, e in enumerate(chunk):
                ids[row, width - len(e):] = torch.tensor(e)
                attn[row, width - len(e):] = 1
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()
            with torch.no_grad(), ctx:
                model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            count += len(chunk) * min(tail, width)
    finally:
        for h in hooks:
            h.remove()
    return {n: s / count for n, s in sums.items()}


def contrast_init(model: Any, tok: Any, harmful: list[Record], benign: list[Record], tail: int = 5,
                  adapter: str = "default") -> dict[str, float]:
    """Set row 0 of each LoRA A to the benign-orthogonal harmful-minus-benign input direction.

    Returns, per module, the separation of the direction: (mean harmful projection - mean benign projection)
    relative to the norm of the mean input, a quick read-out of how linearly separable the two sets are there.
    """
    import torch

    modules = _lora_modules(model)
    mu_h = mean_inputs(model, tok, harmful, modules, tail)
    mu_b = mean_inputs(model, tok, benign, modules, tail)
    report = {}
    with torch.no_grad():
        for name, mod in modules.items():
            A = mod.lora_A[adapter].weight  # (r, in)
            d = mu_h[name] - mu_b[name]
            b = mu_b[name]
            d = d - (d @ b) / (b @ b).clamp_min(1e-12) * b
            norm = d.norm()
            if norm < 1e-12:
                continue
            target_norm = A[0].norm().clamp_min(1e-6)  # keep PEFT's initial scale
            A[0].copy_((d / norm * target_norm).to(A.dtype))
            report[name] = float(((mu_h[name] - mu_b[name]) @ d) / (norm * mu_b[name].norm().clamp_min(1e-12)))
    return report
