"""The trainer's start-up check of its speed paths against the model's own forward, on the architecture at hand.

What training consumes is compared: the loss and its gradient with respect to every trainable parameter, on a few
short examples (<= 4), computed

- by the reference: `model(input_ids, attention_mask).logits` (all positions, no cached prefix, the model's own
  attention implementation and fp32 weights), then the objective of training/loss.py;
- by the speed paths that are on (cached frozen prefix, shared prompt prefix, LM head on response positions only,
  the training attention kernel, bf16 frozen weights);

both under the same autocast setting (with bf16 autocast or a bfloat16 prefix cache, the looser tolerance), in eval mode (no dropout), with every LoRA B set to small random values
(B is 0 at initialisation, which would make the loss blind to the adapter and hide errors in the gradient of A);
B is restored exactly afterwards, the parameters' `.grad` and the global RNG are not touched.
They agree when   |loss_fast - loss_ref| <= tol_loss * |loss_ref|   and
                  ||g_fast - g_ref|| <= tol_grad * ||g_ref||   (all trainable parameters as one vector).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..data.chat import Encoded
from .config import TrainConfig, bf16_autocast
from .examples import collate
from .loss import compute_loss

# (loss, gradient) relative tolerances: exact fp32 arithmetic in another order, or bf16 autocast (eager vs SDPA
# softmax precision, bf16 rounding of differently shaped products)
TOLERANCE = {False: (1e-4, 1e-3), True: (3e-2, 1e-1)}
B_STD = 0.05  # LoRA B's random values during the check


def check_indices(examples: list[Encoded], n: int = 4) -> list[int]:
    """Up to `n` short examples: the shortest anchors and the shortest other examples, half each where both exist
    (so the anchor term, e.g. the KL pass, is part of the check)."""
    anchors = sorted((i for i, e in enumerate(examples) if e.kind == "anchor"), key=lambda i: len(examples[i].input_ids))
    others = sorted((i for i, e in enumerate(examples) if e.kind != "anchor"), key=lambda i: len(examples[i].input_ids))
    half = n // 2 if anchors and others else n
    picked = others[:half] + anchors[: n - min(half, len(others))]
    return sorted(picked[:n])


@contextlib.contextmanager
def probe_state(model: Any, seed: int = 0) -> Iterator[None]:
    """Eval mode and random LoRA B (from a private generator) for the check; the exact state back afterwards."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    saved = [(p, p.data.clone()) for n, p in model.named_parameters() if "lora_B" in n]
    flags = [(p, p.requires_grad) for p in model.parameters()]  # PEFT's disable_adapter (the KL pass) resets them
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for p, data in saved:
                p.copy_((torch.randn(data.shape, generator=gen) * B_STD).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.copy_(data)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@dataclass
class Measure:
    loss: float
    grad: Any  # all trainable parameters' gradients, flattened into one float64 vector


def measure(model: Any, batch: dict[str, Any], cfg: TrainConfig, device: str, use_bf16: bool,
            params: list[Any] | None = None) -> Measure:
    """Loss (training/loss.py) and its gradient on `batch` w.r.t. `params` (default: those requiring grad now),
    without touching the parameters' `.grad`."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    with bf16_autocast(device, use_bf16):
        loss, _ = compute_loss(model, batch, cfg)
    grads = torch.autograd.grad(loss, params, allow_unused=True) if params else []
    flat = [(g if g is not None else torch.zeros_like(p)).detach().double().flatten() for g, p in zip(grads, params)]
    return Measure(float(loss.detach()), torch.cat(flat) if flat else torch.zeros(1, dtype=torch.float64))


def difference(ref: Measure, got: Measure, use_bf16: bool) -> str | None:
    """None when `got` agrees with `ref` (module docstring), else the relative errors in words."""
    tol_loss, tol_grad = TOLERANCE[use_bf16]
    e_loss = abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-12)
    e_grad = float((got.grad.to(ref.grad.device) - ref.grad).norm() / ref.grad.norm().clamp_min(1e-30))
    if e_loss <= tol_loss and e_grad <= tol_grad and e_loss == e_loss and e_grad == e_grad:
        return None
    return (f"loss differs from the model's own forward by rel {e_loss:.1e}, its gradient by rel {e_grad:.1e} "
            f"(tolerance {tol_loss:g} / {tol_grad:g})")


class SpeedCheck:
    """The reference measure, taken once before any speed path is applied, and `check(batch_fn)` for a set of
    paths (None: they agree; else why not, an exception raised by a path included)."""

    def __init__(self, model: Any, cfg: TrainConfig, examples: list[Encoded], device: str, use_bf16: bool,
                 pad_id: int):
        self.model, self.cfg, self.device, self.use_bf16 = model, cfg, device, use_bf16
        self.idx = check_indices(examples)
        self.examples, self.pad_id = examples, pad_id
        self.ref: Measure | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]  # what the optimizer trains
        if self.idx and any(p.requires_grad for p in model.parameters()):
            batch = {k: v.to(device) for k, v in collate(examples, self.idx, pad_id).items()}
            batch["full_logits"] = batch["is_anchor"].new_ones(batch["is_anchor"].shape)
            with probe_state(model):
                self.ref = measure(model, batch, cfg, device, use_bf16, self.params)

    def check(self, batch_fn: Callable[[list[int]], dict[str, Any]]) -> str | None:
        if self.ref is None:
            return None
        try:
            with probe_state(self.model):
                got = measure(self.model, batch_fn(self.idx), self.cfg, self.device, self.use_bf16, self.params)
        except Exception as e:  # noqa: BLE001 - a path that cannot run on this architecture is switched off
            return f"raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        # a bfloat16 prefix cache is a rounding the recipe asked for: judged with the bf16 tolerance
        return difference(self.ref, got, self.use_bf16 or self.cfg.prefix_cache_dtype == "bfloat16")
