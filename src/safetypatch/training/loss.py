"""The refusal-SFT objective on one batch.

Per response token t (targets are the labels shifted by one; prompt and padding are ignored):
    refusal / recovery / mixed rows:  CE_t = -log p_patched(y_t)  (a recovery row's response is its refusal,
                           after the compliant prefix, so its first tokens get the decision weight)
    anchor rows:           CE_t (self-distillation on the base model's own answer), or with `benign_loss` 'kl'
                           KL_t(base || patched) (modeling.token_kl, the base = the adapter switched off)
    weight_t = benign_weight on anchor rows, else 1; times decision_weight on a response's first decision_tokens
    loss = sum_t weight_t * term_t / (number of response tokens)
Under data parallelism the divisor is the micro-batch's response-token count over all ranks (`normalizer`), so
the ranks' losses add up to the one-process loss of the whole micro-batch (training/distributed.py).
"""

from __future__ import annotations

from typing import Any

from ..data.chat import IGNORE_INDEX
from ..modeling import token_kl, unwrap_lm, variant
from .config import TrainConfig
from .forward import forward_from_layer, head_logits


def response_logits(model: Any, batch: dict[str, Any], response_only: bool) -> tuple[Any, Any, Any]:
    """Logits at the positions that predict response tokens, the targets, and which rows they come from.

    The reference is the model's own `model(input_ids, attention_mask).logits` (no cached prefix, `response_only`
    off); the other paths (cached prefix, head on response positions only) are checked against it at start-up."""
    import torch

    response_only = response_only and "full_logits" not in batch  # the batch's own switch (speed check, fallback)
    labels = batch["labels"]
    target_mask = labels[:, 1:] != IGNORE_INDEX
    if "prefix_hidden" in batch:  # frozen bottom layers cached: run from the first patched layer up
        lm = unwrap_lm(model)
        shared = int(batch["shared_prefix"][0]) if "shared_prefix" in batch else 0
        hidden = forward_from_layer(lm, batch["prefix_hidden"], batch["attention_mask"], int(batch["prefix_start"][0]),
                                    shared=shared)
        logits = (head_logits(lm, hidden[:, :-1][target_mask]) if response_only
                  else head_logits(lm, hidden)[:, :-1][target_mask])
    elif response_only:
        lm = unwrap_lm(model)
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
        logits = head_logits(lm, hidden[:, :-1][target_mask])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1][target_mask]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    return logits.float(), labels[:, 1:][target_mask], rows


def response_positions(batch: dict[str, Any]) -> Any:
    """Index of each target token within its response (0 = first answer token), aligned with response_logits."""
    target_mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return (target_mask.long().cumsum(1) - 1)[target_mask]


def response_tokens(batch: dict[str, Any]) -> int:
    """The number of response tokens the batch's loss is taken over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def compute_loss(model: Any, batch: dict[str, Any], cfg: TrainConfig, normalizer: float | None = None
                 ) -> tuple[Any, dict[str, float]]:
    """The batch's loss (see the module docstring; divided by `normalizer` instead of the batch's own response
    tokens when given) and its parts' means (refusal, anchor) for the log."""
    import torch
    import torch.nn.functional as F

    logits, targets, rows = response_logits(model, batch, cfg.response_only_logits)
    is_anchor = batch["is_anchor"][rows].bool()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    parts: dict[str, float] = {}
    if cfg.benign_loss == "kl" and is_anchor.any() and hasattr(model, "disable_adapter"):
        sub = {k: v[batch["is_anchor"].bool()] for k, v in batch.items()}
        with torch.no_grad(), variant(model, "base"):
            base_logits, _, _ = response_logits(model, sub, cfg.response_only_logits)
        logp = F.log_softmax(logits[is_anchor], -1)
        logq = F.log_softmax(base_logits, -1)
        per_token = per_token.clone()
        per_token[is_anchor] = token_kl(logq, logp)
    weights = torch.where(is_anchor, torch.full_like(per_token, cfg.benign_weight), torch.ones_like(per_token))
    if cfg.decision_tokens > 0 and cfg.decision_weight != 1.0:
        early = response_positions(batch) < cfg.decision_tokens
        weights = torch.where(early, weights * cfg.decision_weight, weights)
    loss = (per_token * weights).sum() / max(1, normalizer if normalizer is not None else per_token.numel())
    with torch.no_grad():
        if (~is_anchor).any():
            parts["refusal"] = float(per_token[~is_anchor].mean())
        if is_anchor.any():
            parts["anchor"] = float(per_token[is_anchor].mean())
    return loss, parts
