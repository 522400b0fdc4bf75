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

from ..data.chat import prompt_ids
from ..data.readers import Record
from ..modeling import variant
from .config import TrainConfig


def lora_modules(model: Any) -> dict[str, Any]:
    """The LoRA layers of a PeftModel by module name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def mean_inputs(model: Any, tok: Any, records: list[Record], modules: dict[str, Any], tail: int = 5,
                batch_size: int = 16, second_moment: bool = False, max_length: int | None = None,
                progress: bool = True, desc: str = "A-init: mean inputs") -> dict[str, Any]:
    """Mean input of each module over the last `tail` prompt tokens (left-padded batches, adapter off). A prompt
    longer than `max_length` tokens keeps its last `max_length` (as training truncates prompts from the left).

    With `second_moment`, values are (mean, E[x x^T]) pairs, for a within-class covariance. With `progress`, a bar
    named `desc` counts the prompts (stderr).
    """
    import torch
    from tqdm.auto import tqdm

    sums: dict[str, Any] = {}
    outer: dict[str, Any] = {}
    count = 0
    hooks = []
    shape: list[int] = [0, 0]  # the current batch's (rows, width)

    def make_hook(name: str):
        def hook(_mod: Any, args: tuple) -> None:
            x = args[0]
            if x.dim() == 2:  # a model that flattens (batch, seq) before its MLP (OPT): put the positions back
                x = x.reshape(shape[0], shape[1], -1)
            x = x[:, -tail:, :].detach().double()
            sums[name] = sums.get(name, 0) + x.sum(dim=(0, 1))
            if second_moment:
                flat = x.reshape(-1, x.shape[-1])
                outer[name] = outer.get(name, 0) + flat.T @ flat
        return hook

    for name, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    device = next(model.parameters()).device
    bar = tqdm(total=len(records), desc=desc, leave=False, disable=not progress or len(records) < 2)
    try:
        encoded = [prompt_ids(tok, r.chat()) for r in records]
        encoded = [ids[-max_length:] for ids in encoded] if max_length else encoded
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i: i + batch_size]
            width = max(len(e) for e in chunk)
            shape[:] = [len(chunk), width]
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, e in enumerate(chunk):
                ids[row, width - len(e):] = torch.tensor(e)
                attn[row, width - len(e):] = 1
            with torch.no_grad(), variant(model, "base"):
                model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            count += len(chunk) * min(tail, width)
            bar.update(len(chunk))
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    if second_moment:
        return {n: (s / count, outer[n] / count) for n, s in sums.items()}
    return {n: s / count for n, s in sums.items()}


def contrast_init(model: Any, tok: Any, harmful: list[Record], benign: list[Record], tail: int = 5,
                  adapter: str = "default", lda: bool = False, shrinkage: float = 0.1,
                  max_length: int | None = None, progress: bool = True) -> dict[str, float]:
    """Set the rows of each LoRA A to benign-orthogonal harmful-minus-benign input directions.

    Row i gets the direction of harmful group i (see `harmful_groups`); rows beyond the number of groups keep
    PEFT's initialisation.

    With `lda`, the difference of means is first whitened by the pooled within-class covariance (Fisher's linear
    discriminant, shrunk towards a scaled identity), so variation shared by both sets (phrasing, length, syntax)
    does not count as evidence of harm.

    Returns, per module, Fisher's separation of the chosen directions (mean over rows): the gap between the two
    classes' mean projections divided by the pooled standard deviation of the projections.

    With `progress`, bars named "A-init: ..." show the passes over the prompts and the modules (stderr).
    """
    import torch
    from tqdm.auto import tqdm

    modules = lora_modules(model)
    rank = next(iter(modules.values())).lora_A[adapter].weight.shape[0] if modules else 1
    groups = harmful_groups(harmful, rank)
    names = [f"harmful group {k + 1}/{len(groups)}" if len(groups) > 1 else "harmful" for k in range(len(groups))]
    stats_hs = [mean_inputs(model, tok, g, modules, tail, second_moment=True, max_length=max_length,
                            progress=progress, desc=f"A-init: {what} prompts") for g, what in zip(groups, names)]
    stats_b = mean_inputs(model, tok, benign, modules, tail, second_moment=True, max_length=max_length,
                          progress=progress, desc="A-init: benign prompts")
    report = {}
    with torch.no_grad():
        for name, mod in tqdm(modules.items(), total=len(modules), desc="A-init: directions per module",
                              leave=False, disable=not progress or len(modules) < 2):
            A = mod.lora_A[adapter].weight  # (r, in)
            target_norm = A[0].norm().clamp_min(1e-6)  # keep PEFT's initial scale
            seps = []
            for row, stats_h in enumerate(stats_hs):
                (mu_h, m2_h), (mu_b, m2_b) = stats_h[name], stats_b[name]
                cov = 0.5 * ((m2_h - torch.outer(mu_h, mu_h)) + (m2_b - torch.outer(mu_b, mu_b)))
                diff = mu_h - mu_b
                if lda:
                    dim = cov.shape[0]
                    reg = (1 - shrinkage) * cov + shrinkage * cov.trace() / dim * torch.eye(dim, dtype=cov.dtype)
                    d = torch.linalg.solve(reg, diff)
                else:
                    d = diff.clone()
                d = d - (d @ mu_b) / (mu_b @ mu_b).clamp_min(1e-12) * mu_b  # benign inputs project to ~0
                norm = d.norm()
                if norm < 1e-12:
                    continue
                A[row].copy_((d / norm * target_norm).to(A.dtype))
                seps.append(float((diff @ d) / (d @ cov @ d).clamp_min(1e-24).sqrt()))
            if seps:
                report[name] = sum(seps) / len(seps)
    return report


def harmful_groups(harmful: list[Record], rank: int) -> list[list[Record]]:
    """Split harmful records into `rank` groups of whole harm categories (round-robin over sorted categories), so
    a rank-r patch gets one detector per group; rank 1 (or no categories) keeps them together."""
    cats = sorted({str(r.meta.get("category", "")) for r in harmful})
    if rank <= 1 or len(cats) < 2:
        return [harmful]
    n = min(rank, len(cats))
    return [[r for r in harmful if cats.index(str(r.meta.get("category", ""))) % n == g] for g in range(n)]


def init_patch(cfg: TrainConfig, model: Any, tok: Any, sources: dict[str, list[Record]], data_meta: dict[str, Any],
               fresh: bool, progress: bool = True) -> None:
    """LoRA A: the contrast / LDA initialisation (on a fresh run; a checkpoint holds A), then frozen if asked."""
    if cfg.method != "lora":
        return
    if cfg.init in ("contrast", "lda") and fresh:
        sep = contrast_init(model, tok, sources["refusal"], sources["anchor"], lda=cfg.init == "lda",
                            max_length=cfg.max_length, progress=progress)
        data_meta["init"] = {"method": cfg.init, "fisher_separation": sep}
    if cfg.freeze_a:
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
