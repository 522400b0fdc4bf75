"""Token-level scoring shared by training and evaluation.

KL(base || patched) per position, from the two models' log-probabilities over the vocabulary:
    KL_t = sum_v p_base(v) (log p_base(v) - log p_patched(v))
with xlogy semantics: a token with p_base = 0 contributes 0 (never NaN). Used by the trainer's KL anchor loss, the
suites' `kl` entries and the red-teaming rounds' drift measure, so all three compute the same quantity.
"""

from __future__ import annotations

from typing import Any


def token_kl(logp_base: Any, logp_patched: Any) -> Any:
    """KL(base || patched) at each position: log-probabilities [..., vocab] in, [...] out (differentiable in
    `logp_patched`)."""
    import torch

    p_base = logp_base.exp()
    return torch.where(p_base > 0, p_base * (logp_base - logp_patched), torch.zeros_like(p_base)).sum(-1)
