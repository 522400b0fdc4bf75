"""Overlap regularizer (Xue & Mirzasoleiman 2025): penalise the part of a LoRA update that lies in the base
weight's top-k singular subspace, so the patch stays orthogonal to what the model already does.

With W0 = U S V^T, top-k factors U_k, S_k, V_k, and dW = scale * B A:
    column: || S_k U_k^T dW ||_F^2        row: || dW V_k S_k ||_F^2        both: their sum
"uniform" replaces S_k by the identity (every top-k direction counts the same); "normalized" uses S_k / s_1, so
the penalty is at most ||dW||_F^2 whatever the scale of W0 and beta means the same on every layer. The bases are
computed once before training (float64 SVD, cached per base model by modeling.SVDCache); each step costs only
small (k x r) products: || (S_k U_k^T B) A ||_F^2, never the full dW.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import ConfigError
from .config import TrainConfig

SIDES = ("column", "row", "both")
VARIANTS = ("uniform", "normalized")


class OverlapPenalty:
    """Callable: the summed penalty over every LoRA module of a PeftModel (differentiable in A and B)."""

    def __init__(self, model: Any, k: int, side: str = "both", variant: str = "normalized",
                 adapter: str = "default") -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        from ..modeling import SVDCache, as_out_in, unwrap_lm

        if side not in SIDES or variant not in VARIANTS:
            raise ConfigError(f"overlap side must be one of {SIDES} and variant one of {VARIANTS}")
        self.side, self.adapter = side, adapter
        base = unwrap_lm(model)
        cache = SVDCache(base)
        self.terms: list[tuple[Any, Any, Any]] = []  # (module, U_k^T weighted (k x out), V_k weighted (in x k))
        for name, mod in model.named_modules():
            if not isinstance(mod, LoraLayer) or adapter not in mod.lora_A:
                continue
            base_layer = mod.get_base_layer()
            w0 = as_out_in(base_layer, base_layer.weight.detach().float())  # dW = B A is out x in
            u, s, vh = cache.get(name.replace("base_model.model.", "", 1), w0)
            kk = min(k, s.numel())
            weight = torch.ones(kk, dtype=torch.float64) if variant == "uniform" else s[:kk] / s[0]
            dev = mod.lora_A[adapter].weight.device
            ut = (weight[:, None] * u[:, :kk].T).float().to(dev)  # S_k U_k^T
            v = (vh[:kk].T * weight[None, :]).float().to(dev)  # V_k S_k
            self.terms.append((mod, ut, v))
        if not self.terms:
            raise ValueError("overlap regularizer: the model has no LoRA modules")

    def __call__(self) -> Any:
        total = 0.0
        for mod, ut, v in self.terms:
            a = mod.lora_A[self.adapter].weight
            b = mod.lora_B[self.adapter].weight
            scale = mod.scaling[self.adapter]
            if self.side in ("column", "both"):
                m = ut @ b.float()  # (k x r)
                total = total + scale ** 2 * (m @ a.float()).pow(2).sum()
            if self.side in ("row", "both"):
                n = a.float() @ v  # (r x k)
                total = total + scale ** 2 * (b.float() @ n).pow(2).sum()
        return total


def overlap_penalty(cfg: TrainConfig, model: Any) -> OverlapPenalty | None:
    """The overlap regularizer when `overlap_beta` > 0 (with a warning where it fights the patch itself)."""
    if not cfg.overlap_beta > 0:
        return None
    overlap = OverlapPenalty(model, cfg.overlap_k, cfg.overlap_side, cfg.overlap_variant)
    if cfg.method == "lora" and cfg.freeze_a and cfg.overlap_side in ("row", "both"):
        # measured on the embedded model (docs/geometry.md): side 'both', beta 1, frozen LDA A -> no refusal learnt
        print(f"warning: overlap_side={cfg.overlap_side} with a frozen A: dW V_k = B (A V_k) can only shrink "
              "by shrinking B, so the row penalty fights the patch itself; use --overlap-side column or "
              "--freeze-a false", file=sys.stderr)
    return overlap
