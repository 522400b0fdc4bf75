"""One optimizer step, and the model made ready for it (which parameters train)."""

from __future__ import annotations

from typing import Any

from ..config import parse_layers
from ..errors import ConfigError
from ..modeling import decoder_layers, enable_checkpointing, num_layers, resolve_targets
from .config import TrainConfig, bf16_autocast
from .distributed import Ranks
from .loss import compute_loss, response_tokens


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
    """Make the right parameters trainable: a fresh LoRA patch, or the selected layers for full fine-tuning; with
    gradient checkpointing on (non-reentrant, so frozen inputs need no grad), and a 4-bit base made ready for
    QLoRA (peft.prepare_model_for_kbit_training: norms in float32, input grads)."""
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        enable_checkpointing(model)
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
               *, device: str, use_bf16: bool, overlap: Any = None, ranks: Ranks | None = None
               ) -> tuple[float, dict[str, float], int]:
    """One optimizer step over `micro_batches` (one collated batch per gradient-accumulation micro-batch; under
    data parallelism this rank's slice of it: None when the slice is empty, or a stand-in marked `skip_loss`):
    forward + backward each, gradients summed over ranks, clip, step, schedule. Returns the step's (loss, loss
    parts, tokens seen) over all ranks."""
    ranks = ranks or Ranks()
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    loss_sum, parts_sum, tokens = 0.0, {}, 0
    for batch in micro_batches:
        skip = batch is None or bool(batch.pop("skip_loss", False))  # a rank with no example in this micro-batch
        targets = ranks.all_sum([0 if skip else response_tokens(batch)])[0]
        if batch is None:
            continue
        with bf16_autocast(device, use_bf16):
            loss, parts = compute_loss(model, batch, cfg, normalizer=global_normalizer(targets, ranks))
        if skip:  # a sharded engine's ranks all run the backward: this one adds zero gradients
            backward(loss * 0.0, ranks)
            continue
        if overlap is not None:
            penalty = overlap()
            loss = loss + cfg.overlap_beta * penalty / ranks.world  # the ranks' shares add up to one penalty
            parts["overlap"] = float(penalty.detach())
        backward(loss / n, ranks)
        loss_sum += float(loss.detach()) / n
        for kk, vv in parts.items():
            parts_sum[kk] = parts_sum.get(kk, 0.0) + vv / n
        tokens += int(batch["attention_mask"].sum())
    ranks.sync_gradients(params)
    clip_gradients(params, ranks)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_totals(loss_sum, parts_sum, tokens, ranks)


def global_normalizer(targets: float, ranks: Ranks) -> float | None:
    """What each rank divides its loss sum by: the global response-token count (ddp sums the gradients), that
    over the world size (a sharded engine averages them), or None (one process: the batch's own count)."""
    if not ranks.multi:
        return None
    return targets / ranks.world if ranks.sharded else targets


def backward(loss: Any, ranks: Ranks) -> None:
    if ranks.accelerator is not None:
        ranks.accelerator.backward(loss)  # a sharded engine reduces (and, under DeepSpeed, steps) itself
    else:
        loss.backward()


def clip_gradients(params: list[Any], ranks: Ranks) -> None:
    import torch

    if ranks.accelerator is not None:
        ranks.accelerator.clip_grad_norm_(params, 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(params, 1.0)


PARTS = ("refusal", "anchor", "overlap")  # the loss parts compute_loss / train_step may log


def step_totals(loss: float, parts: dict[str, float], tokens: int, ranks: Ranks
                ) -> tuple[float, dict[str, float], int]:
    """The step's loss and token count over all ranks (each rank's loss is its share of the global one) and each
    loss part averaged over the ranks that saw it, for the log; unchanged in one process."""
    if not ranks.multi:
        return loss, parts, tokens
    summed = ranks.all_sum([loss, tokens, *(x for k in PARTS for x in (parts.get(k, 0.0), float(k in parts)))])
    if ranks.sharded:  # a sharded engine averages gradients, so each rank's loss was scaled by the world size
        summed[0] /= ranks.world
    pairs = zip(PARTS, summed[2::2], summed[3::2])
    return summed[0], {k: v / c for k, v, c in pairs if c}, int(summed[1])
