"""One optimizer step, and the model made ready for it (which parameters train)."""

from __future__ import annotations

from typing import Any

from ..config import parse_layers
from ..errors import ConfigError
from ..modeling import decoder_layers, num_layers, resolve_targets
from .config import TrainConfig, bf16_autocast
from .loss import compute_loss


def check_model_fit(cfg: TrainConfig, model: Any) -> None:
    """ConfigError, before anything is written, when the recipe does not fit the model: a layer out of range, or
    (LoRA) a target (role or raw module name, `modeling.resolve_targets`) that no selected layer has as a linear
    layer (what PEFT can patch)."""
    layers = parse_layers(cfg.layers, num_layers(model))
    if cfg.method != "lora":
        return
    res = resolve_targets(model, cfg.target_modules)
    blocks = decoder_layers(model)
    selected = {name for i in layers for name, _ in blocks[i].named_modules()}
    missing = [t for t in res.modules if not any(n == t or n.endswith(f".{t}") for n in selected)]
    if missing:
        raise ConfigError(f"--target-modules / field 'target_modules': {missing} is not a linear layer of "
                          f"{type(model).__name__}'s layers '{cfg.layers}'; its layers hold "
                          f"{', '.join(res.layer_modules)}")


def prepare_model(cfg: TrainConfig, model: Any) -> Any:
    """Make the right parameters trainable: a fresh LoRA patch, or the selected layers for full fine-tuning."""
    if cfg.method == "lora":
        from ..patches import attach_new_patch

        return attach_new_patch(model, cfg.shape(), seed=cfg.seed)
    layers = set(parse_layers(cfg.layers, num_layers(model)))
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(decoder_layers(model)):
        if i in layers:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model


def train_step(model: Any, micro_batches: Any, cfg: TrainConfig, optimizer: Any, scheduler: Any, params: list[Any],
               *, device: str, use_bf16: bool, overlap: Any = None) -> tuple[float, dict[str, float], int]:
    """One optimizer step over `micro_batches` (a list of collated batches, one per gradient-accumulation
    micro-batch): forward + backward each, clip, step, schedule. Returns (loss, loss parts, tokens seen)."""
    import torch

    micro_batches = list(micro_batches)
    n = len(micro_batches)
    loss_sum, parts_sum, tokens = 0.0, {}, 0
    for batch in micro_batches:
        with bf16_autocast(device, use_bf16):
            loss, parts = compute_loss(model, batch, cfg)
        if overlap is not None:
            penalty = overlap()
            loss = loss + cfg.overlap_beta * penalty
            parts["overlap"] = float(penalty.detach())
        (loss / n).backward()
        loss_sum += float(loss.detach()) / n
        for kk, vv in parts.items():
            parts_sum[kk] = parts_sum.get(kk, 0.0) + vv / n
        tokens += int(batch["attention_mask"].sum())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, parts_sum, tokens
