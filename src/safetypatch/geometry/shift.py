"""How far a weight update moves hidden states: per decoder layer, the relative change of the hidden state at the
last prompt token, ||h_patched - h_base|| / ||h_base||, averaged over prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..modeling import as_chat, variant

if TYPE_CHECKING:
    import torch


def _last_token_states(model: Any, tok: Any, prompts: Sequence[Any], progress: bool = True,
                       desc: str = "hidden states") -> list["torch.Tensor"]:
    """Per prompt: (n_layers, hidden) float64 hidden states at the last prompt token, after each block."""
    import torch
    from tqdm.auto import tqdm

    from ..data import prompt_ids

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for p in tqdm(prompts, desc=desc, leave=False, disable=not progress or len(prompts) < 2):
            ids = torch.tensor([prompt_ids(tok, as_chat(p))], device=device)
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0, -1] for h in hs[1:]]).double().cpu())
    return out


def hidden_shift(model: Any, tok: Any, prompts: Sequence[Any], base: Any = None, progress: bool = True,
                 desc: str = "hidden-state shift") -> list[float]:
    """Per decoder layer: mean over prompts of ||h_patched - h_base|| / ||h_base|| at the last prompt token.

    `model` is a PeftModel (its base is run as `variant(model, "base")`), or any model with `base` given
    (e.g. a fully fine-tuned copy). Entry i is the output of block i (for Llama the last one is after the final norm).
    With `progress`, bars "`desc` (base)" and "`desc` (patched)" count the prompts (stderr).
    """
    if not prompts:
        return []
    if base is None:
        with variant(model, "base") as m:
            h0 = _last_token_states(m, tok, prompts, progress, f"{desc} (base)")
    else:
        h0 = _last_token_states(base, tok, prompts, progress, f"{desc} (base)")
    h1 = _last_token_states(model, tok, prompts, progress, f"{desc} (patched)")
    ratios = [((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)) for a, b in zip(h0, h1)]
    n = len(ratios)
    return [float(sum(r[i] for r in ratios) / n) for i in range(ratios[0].shape[0])]


def default_prompts(limit: int = 20) -> tuple[list[Any], list[Any]]:
    """(harmful, benign) records from the built-in dev splits, at most `limit` each."""
    from ..data import builtin_split

    return builtin_split("harmful", "dev")[:limit], builtin_split("benign", "dev")[:limit]
