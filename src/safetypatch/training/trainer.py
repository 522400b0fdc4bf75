"""Refusal-SFT: LoRA patches (and the full fine-tuning / data-mixing baselines) with one trainer.

Objective: cross-entropy on refusal responses to harmful prompts, plus a benign-anchor term that keeps the base
model's own answers to benign prompts (self-distillation CE, or KL(base || patched) on the same tokens), plus
optional mixed general data. Early stopping picks the dev check that refuses most harmful dev prompts without
refusing benign dev prompts more often than the base model.

The loop is written by hand rather than with transformers.Trainer / TRL because its speed paths (logits on
response tokens only, length-grouped batches, bf16 autocast on CPU) and the generation-based early stopping are
not available there; checkpoints make it resumable.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .anchors import base_answers
from ..config import GenerationConfig, parse_layers, to_dict
from .config import TrainConfig
from ..data.builtin import BUILTIN_ANCHORS, BUILTIN_REFUSALS, resolve_prompts
from ..data.chat import IGNORE_INDEX, Encoded, common_prefix_length, encode_example
from ..data.readers import Record, read_records
from ..modeling.generation import generate
from ..modeling.compat import cache_keyword as _cache_keyword
from ..modeling.compat import params as _params
from ..modeling.compat import unwrap_lm as _unwrap_lm
from ..io_utils import atomic_write_json, claim_output_dir, sha256_text
from ..judges import keyword_refusal, keyword_refusal_decided
from ..modeling.loading import load_model, num_layers

CHECKPOINT_DIR = "checkpoint"
_SPEED_FIELDS = ("cache_frozen_prefix", "prefix_cache_dtype", "prefix_cache_max_mb", "bf16_frozen_weights",
                 "train_attention", "share_prompt_prefix")


@dataclass
class TrainResult:
    run_dir: Path
    output_dir: Path  # the patch directory (LoRA) or the fine-tuned model directory (full)
    stats: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model (a PeftModel for LoRA), ready for evaluation


# ------------------------------------------------------------------------------------------------- data
def _records_hash(records: list[Record]) -> str:
    return sha256_text(*(json.dumps([r.chat(), r.response], sort_keys=True) for r in records))


def build_examples(cfg: TrainConfig, model: Any, tok: Any
                   ) -> tuple[list[Encoded], dict[str, Any], dict[str, list[Record]]]:
    """Tokenized training examples (refusals, anchors, mixed data), a description with data hashes, and the
    source records by kind."""
    data = BUILTIN_REFUSALS if cfg.data == "builtin" else cfg.data
    refusals = resolve_prompts(data, cfg.prompt_field, cfg.response_field, require_response=True)
    examples = [encode_example(tok, r.chat(), r.response or "", cfg.max_length, kind="refusal") for r in refusals]
    meta: dict[str, Any] = {"refusal": {"source": data, "n": len(refusals), "sha256": _records_hash(refusals)}}
    sources: dict[str, list[Record]] = {"refusal": refusals, "anchor": []}
    if cfg.benign and cfg.benign.lower() != "none":
        spec = BUILTIN_ANCHORS if cfg.benign == "builtin" else cfg.benign
        benign = resolve_prompts(spec, cfg.prompt_field, None)
        sources["anchor"] = benign
        answers = base_answers(model, tok, benign, cfg.anchor_tokens)
        for r, (ids, finished) in zip(benign, answers):
            if ids:
                examples.append(encode_example(tok, r.chat(), ids, cfg.max_length, kind="anchor", close_turn=finished))
        meta["anchors"] = {"source": spec, "n": len(benign), "sha256": _records_hash(benign),
                           "answer_tokens": cfg.anchor_tokens, "answered_by": "base model (greedy)"}
    if cfg.mix and cfg.mix_ratio > 0:
        mix = read_records(cfg.mix, cfg.prompt_field, cfg.response_field, require_response=True)
        n_mix = round(cfg.mix_ratio / (1 - cfg.mix_ratio) * len(examples))
        rng = random.Random(cfg.seed)
        chosen = [mix[rng.randrange(len(mix))] for _ in range(n_mix)] if n_mix > len(mix) else rng.sample(mix, n_mix)
        examples += [encode_example(tok, r.chat(), r.response or "", cfg.max_length, kind="mix") for r in chosen]
        meta["mix"] = {"source": cfg.mix, "n": n_mix, "ratio": cfg.mix_ratio, "sha256": _records_hash(chosen)}
    return examples, meta, sources


def batches(examples: list[Encoded], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Index batches for one epoch: shuffled; with grouping, similar lengths share a batch (less padding)."""
    rng = random.Random(seed * 1000 + epoch)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * 16
        idx = [i for m in range(0, len(idx), mega)
               for i in sorted(idx[m: m + mega], key=lambda j: -len(examples[j].input_ids))]
    out = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(out)
    return out


def collate(examples: list[Encoded], idx: list[int], pad_id: int, prefix: "PrefixCache | None" = None
            ) -> dict[str, Any]:
    """Right-padded batch; with a prefix cache, also the cached hidden states of the frozen bottom layers."""
    import torch

    width = max(len(examples[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    weight_kind = torch.zeros((len(idx),), dtype=torch.long)  # 0 = refusal / mix, 1 = anchor
    for row, i in enumerate(idx):
        e = examples[i]
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attn[row, :n] = 1
        weight_kind[row] = 1 if e.kind == "anchor" else 0
    out = {"input_ids": ids, "labels": labels, "attention_mask": attn, "is_anchor": weight_kind}
    if prefix is not None and prefix.active:
        out["prefix_hidden"] = prefix.batch(idx, width)
    return out


# ------------------------------------------------------------------------------------------------- loss
def response_logits(model: Any, batch: dict[str, Any], response_only: bool) -> tuple[Any, Any, Any]:
    """Logits at the positions that predict response tokens, the targets, and which rows they come from."""
    import torch

    labels = batch["labels"]
    target_mask = labels[:, 1:] != IGNORE_INDEX
    if "prefix_hidden" in batch:  # frozen bottom layers cached: run from the first patched layer up
        lm = _unwrap_lm(model)
        shared = int(batch["shared_prefix"][0]) if "shared_prefix" in batch else 0
        hidden = forward_from_layer(lm, batch["prefix_hidden"], batch["attention_mask"], int(batch["prefix_start"][0]),
                                    shared=shared)
        head = lm.get_output_embeddings()
        logits = head(hidden[:, :-1][target_mask]) if response_only else head(hidden)[:, :-1][target_mask]
    elif response_only:
        lm = _unwrap_lm(model)
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[:, :-1][target_mask])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1][target_mask]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    return logits.float(), labels[:, 1:][target_mask], rows


def response_positions(batch: dict[str, Any]) -> Any:
    """Index of each target token within its response (0 = first answer token), aligned with response_logits."""
    target_mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return (target_mask.long().cumsum(1) - 1)[target_mask]


def compute_loss(model: Any, batch: dict[str, Any], cfg: TrainConfig) -> tuple[Any, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    logits, targets, rows = response_logits(model, batch, cfg.response_only_logits)
    is_anchor = batch["is_anchor"][rows].bool()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    parts: dict[str, float] = {}
    if cfg.benign_loss == "kl" and is_anchor.any() and hasattr(model, "disable_adapter"):
        sub = {k: v[batch["is_anchor"].bool()] for k, v in batch.items()}
        with torch.no_grad(), model.disable_adapter():
            base_logits, _, _ = response_logits(model, sub, cfg.response_only_logits)
        logp = F.log_softmax(logits[is_anchor], -1)
        logq = F.log_softmax(base_logits, -1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        per_token = per_token.clone()
        per_token[is_anchor] = kl
    weights = torch.where(is_anchor, torch.full_like(per_token, cfg.benign_weight), torch.ones_like(per_token))
    if cfg.decision_tokens > 0 and cfg.decision_weight != 1.0:
        early = response_positions(batch) < cfg.decision_tokens
        weights = torch.where(early, weights * cfg.decision_weight, weights)
    loss = (per_token * weights).sum() / max(1, per_token.numel())
    with torch.no_grad():
        if (~is_anchor).any():
            parts["refusal"] = float(per_token[~is_anchor].mean())
        if is_anchor.any():
            parts["anchor"] = float(per_token[is_anchor].mean())
    return loss, parts


# ------------------------------------------------------------------------------------------------- speed paths
def _decoder_parts(lm: Any) -> Any | None:
    """The decoder of a Llama-like causal LM (embed_tokens, layers, norm, rotary_emb), or None if it is not one."""
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if dec is None or not all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    return dec


def _run_layers(layers: Any, hidden: Any, mask: Any, position_embeddings: Any, position_ids: Any,
                cache: Any = None) -> Any:
    """Call decoder layers directly, passing the KV cache under the keyword this transformers version takes
    (`cache` from 5.x on, `past_key_values` before)."""
    if not layers:
        return hidden
    kw = {_cache_keyword(type(layers[0]).forward): cache}
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                       position_ids=position_ids, use_cache=cache is not None, **kw)
    return hidden


def causal_mask(dec: Any, hidden: Any, attention_mask: Any, position_ids: Any, explicit: bool = False) -> Any:
    """The decoder's causal + padding mask for `hidden`, as its forward builds it (no cache). `explicit`: never
    let SDPA replace the mask by is_causal (a mask that will be sliced must exist)."""
    from transformers.masking_utils import create_causal_mask

    params = _params(create_causal_mask)
    kw: dict[str, Any] = {_cache_keyword(create_causal_mask): None}
    if explicit and "allow_is_causal_skip" in params:
        kw["allow_is_causal_skip"] = False
    if "cache_position" in params:  # transformers 4.x
        kw["cache_position"] = position_ids[0]
    return create_causal_mask(config=dec.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              position_ids=position_ids, **kw)


def run_stack(dec: Any, layers: list[Any], hidden: Any, attention_mask: Any, shared: int = 0) -> Any:
    """Hidden states of right-padded rows after `layers` of a Llama-like decoder `dec` (no final norm), from
    their input `hidden` ([B, T, H]).

    transformers has no API to enter the stack in the middle, so this repeats what LlamaModel.forward does
    (transformers 5): positions 0..T-1, the causal + padding mask from `create_causal_mask` for the model's
    attention implementation, rotary embeddings from `rotary_emb`, then each decoder layer.

    `shared` > 0: the first `shared` tokens are the same in every row (the chat template's system prompt and user
    header). They are run through the layers once, for row 0 only, with a DynamicCache; the cache is repeated over
    the batch and the rest of every row attends to it, as in generation with a cached prompt prefix. Autograd
    flows through the cached keys and values, so gradients are those of the full batch (summed over rows).
    """
    import torch

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_embeddings = dec.rotary_emb(hidden, position_ids=position_ids)
    impl = getattr(dec.config, "_attn_implementation", None)
    mask = causal_mask(dec, hidden, attention_mask, position_ids, explicit=shared > 0)
    if shared <= 0 or impl not in ("eager", "sdpa") or not torch.is_tensor(mask) or mask.dim() != 4:
        return _run_layers(layers, hidden, mask, position_embeddings, position_ids)
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=dec.config)
    except TypeError:  # older transformers: layers are created on first update
        cache = DynamicCache()
    cos, sin = position_embeddings
    head = _run_layers(layers, hidden[:1, :shared], mask[:1, :, :shared, :shared],
                       (cos[:, :shared], sin[:, :shared]), position_ids[:, :shared], cache)
    cache.batch_repeat_interleave(hidden.shape[0])
    tail = _run_layers(layers, hidden[:, shared:], mask[:, :, shared:, :], (cos[:, shared:], sin[:, shared:]),
                       position_ids[:, shared:], cache)
    return torch.cat([head.expand(hidden.shape[0], -1, -1), tail], dim=1)


def forward_from_layer(lm: Any, hidden: Any, attention_mask: Any, start: int, shared: int = 0) -> Any:
    """Final-norm hidden states of a Llama-like decoder, from the input of layer `start` (see run_stack)."""
    dec = lm.get_decoder()
    return dec.norm(run_stack(dec, list(dec.layers[start: dec.config.num_hidden_layers]), hidden, attention_mask,
                              shared))


def shared_prefix_length(examples: list[Encoded], minimum: int = 4) -> int:
    """Number of leading tokens every example shares (at most the shortest example's length - 1), or 0 if fewer
    than `minimum`."""
    n = common_prefix_length([e.input_ids for e in examples])
    return n if n >= minimum else 0


def first_trained_layer(model: Any) -> int:
    """Index of the lowest decoder layer holding a trainable parameter or a LoRA module (0 if the embeddings train)."""
    from ..modeling.loading import decoder_layers

    lm = _unwrap_lm(model)
    emb = lm.get_input_embeddings()
    if any(p.requires_grad for p in emb.parameters()):
        return 0
    for i, layer in enumerate(decoder_layers(model)):
        if any(p.requires_grad or "lora_" in n for n, p in layer.named_parameters()):
            return i
    return 0


class PrefixCache:
    """Hidden states entering the first trained layer, one tensor per example, computed once (no grad).

    The layers below it and the embeddings are frozen and carry no adapter, so their output for a given example
    never changes during training; every epoch after the first (and the KL anchor's base pass) reuses it.
    """

    def __init__(self, model: Any, examples: list[Encoded], cfg: TrainConfig, device: str, use_bf16: bool,
                 pad_id: int, shared: int = 0):
        self.active = False
        self.shared = shared  # leading tokens all examples share, run once per build batch
        self.reason = ""
        self.start = 0
        self.states: list[Any] = []
        self.megabytes = 0.0
        if not cfg.cache_frozen_prefix:
            self.reason = "off"
            return
        lm = _unwrap_lm(model)
        dec = _decoder_parts(lm)
        if dec is None:
            self.reason = f"{type(lm).__name__} is not a Llama-like decoder"
            return
        start = first_trained_layer(model)
        if start == 0:
            self.reason = "the first layer is trained: nothing frozen below it"
            return
        if float(getattr(lm.config, "attention_dropout", 0.0) or 0.0) > 0 or getattr(lm.config, "sliding_window",
                                                                                        None):
            self.reason = "attention dropout or sliding-window attention in the frozen layers"
            return
        hidden_size = int(lm.config.hidden_size)
        n_tokens = sum(len(e.input_ids) for e in examples)
        bytes_per = 2 if cfg.prefix_cache_dtype == "bfloat16" else 4
        self.megabytes = n_tokens * hidden_size * bytes_per / 2**20
        if self.megabytes > cfg.prefix_cache_max_mb:
            self.reason = (f"cache would take {self.megabytes:.0f} MB > prefix_cache_max_mb "
                           f"{cfg.prefix_cache_max_mb:.0f}")
            return
        self.start, self.device, self.use_bf16 = start, device, use_bf16
        self.dtype_name = cfg.prefix_cache_dtype
        self._build(model, examples, pad_id)
        self.active = True
        self.reason = f"layers 0-{start - 1} cached ({self.megabytes:.1f} MB, {cfg.prefix_cache_dtype})"

    def _bottom(self, lm: Any, input_ids: Any, attention_mask: Any) -> Any:
        dec = lm.get_decoder()
        return run_stack(dec, list(dec.layers[: self.start]), dec.embed_tokens(input_ids), attention_mask,
                         self.shared)

    def _build(self, model: Any, examples: list[Encoded], pad_id: int, batch_size: int = 16) -> None:
        import torch

        lm = _unwrap_lm(model)
        dtype = getattr(torch, self.dtype_name)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        self.states = [None] * len(examples)
        with torch.no_grad(), torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16,
                                             enabled=self.use_bf16):
            for k in range(0, len(order), batch_size):
                idx = order[k: k + batch_size]
                b = collate(examples, idx, pad_id)
                h = self._bottom(lm, b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
                for row, i in enumerate(idx):
                    self.states[i] = h[row, : len(examples[i].input_ids)].to(dtype).clone()

    def batch(self, idx: list[int], width: int) -> Any:
        """Right-padded [B, width, hidden] float32 states for these examples (padding rows are zeros)."""
        import torch

        h = self.states[idx[0]]
        out = torch.zeros((len(idx), width, h.shape[-1]), dtype=torch.float32, device=h.device)
        for row, i in enumerate(idx):
            out[row, : self.states[i].shape[0]] = self.states[i]
        return out

    def check(self, model: Any, examples: list[Encoded], pad_id: int, shared: int = 0, rtol: float = 2e-2) -> bool:
        """Whether the cached path (with `shared` prompt-prefix tokens computed once) gives the full stack's final
        hidden states on a few examples, within `rtol`. A mismatch means an architecture whose forward this
        module does not reproduce; the error goes to `self.check_error`."""
        import torch

        lm = _unwrap_lm(model)
        idx = list(range(min(4, len(examples))))
        b = collate(examples, idx, pad_id, prefix=self)
        b = {k: v.to(self.device) for k, v in b.items()}
        with torch.no_grad(), torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16,
                                             enabled=self.use_bf16):
            ref = lm.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   use_cache=False).last_hidden_state.float()
            got = forward_from_layer(lm, b["prefix_hidden"], b["attention_mask"], self.start, shared).float()
        m = b["attention_mask"].bool()
        self.check_error = float((ref[m] - got[m]).norm() / ref[m].norm().clamp_min(1e-12))
        return self.check_error <= rtol

    def disable(self, why: str) -> None:
        self.active, self.states, self.reason = False, [], why


class SpeedPaths:
    """The trainer's speed paths around the training steps (a context manager that restores the model on exit):
    the frozen-prefix cache, bf16 copies of frozen linear weights under bf16 autocast, and the attention kernel.
    `collate(idx)` builds a batch that uses them; `for_generation()` is a context for dev checks in between."""

    def __init__(self, model: Any, cfg: TrainConfig, examples: list[Encoded], device: str, use_bf16: bool,
                 pad_id: int):
        self.model, self.cfg, self.examples, self.device = model, cfg, examples, device
        self.use_bf16, self.pad_id = use_bf16, pad_id
        self.prefix: PrefixCache | None = None
        self.shared = 0
        self.shared_reason = "off"
        self._saved_weights: list[tuple[Any, Any]] = []
        self._attn_orig: str | None = None
        self._attn_train: str | None = None
        self.malloc = "off"

    # -- attention kernel
    def _lm(self) -> Any:
        return _unwrap_lm(self.model)

    def _set_attn(self, impl: str | None) -> None:
        lm = self._lm()
        if impl and getattr(lm.config, "_attn_implementation", None) != impl:
            lm.set_attn_implementation(impl)

    def _choose_attn(self) -> str | None:
        choice = self.cfg.train_attention
        if choice == "keep":
            return None
        if choice == "auto":
            return "eager" if (self.use_bf16 and not self.device.startswith("cuda")) else None
        return choice

    # -- bf16 frozen weights
    def _cast_frozen(self) -> None:
        import torch

        from ..modeling.loading import decoder_layers

        for layer in decoder_layers(self.model):
            for name, mod in layer.named_modules():
                w = getattr(mod, "weight", None)
                if (isinstance(mod, torch.nn.Linear) and w is not None and not w.requires_grad
                        and w.dtype == torch.float32 and "lora_" not in name):  # a frozen LoRA A is patch state
                    self._saved_weights.append((mod, w.data))
                    w.data = w.data.to(torch.bfloat16)

    def _restore_weights(self) -> None:
        for mod, data in self._saved_weights:
            mod.weight.data = data
        self._saved_weights = []

    def __enter__(self) -> "SpeedPaths":
        if self.cfg.tune_malloc and self.device.split(":")[0] == "cpu":
            from .malloc import tune_malloc

            self.malloc = tune_malloc()
        if self.cfg.bf16_frozen_weights and self.use_bf16:
            self._cast_frozen()  # before the prefix cache is built: its forward uses them too
        self.n_cast = len(self._saved_weights)
        try:
            self._build_prefix_cache()
        except BaseException:
            self._restore_weights()
            raise
        self._attn_orig = getattr(self._lm().config, "_attn_implementation", None)
        self._attn_train = self._choose_attn()
        try:
            self._set_attn(self._attn_train)
        except (ValueError, ImportError, AttributeError):  # kernel unavailable for this model: keep its own
            self._attn_train = None
        return self

    def _build_prefix_cache(self) -> None:
        """Build the frozen-prefix cache (with the shared prompt prefix run once per batch, if on) and check the
        cached path against the full forward; turn off what does not match."""
        n = shared_prefix_length(self.examples) if self.cfg.share_prompt_prefix else 0
        make = lambda shared: PrefixCache(self.model, self.examples, self.cfg, self.device,  # noqa: E731
                                          self.use_bf16, self.pad_id, shared=shared)
        pc = self.prefix = make(n)
        if not pc.active:
            self.shared_reason = "needs the frozen-prefix cache" if self.cfg.share_prompt_prefix else "off"
            return
        if self.cfg.share_prompt_prefix and n == 0:
            self.shared_reason = "the examples share no prompt prefix"
        elif n:
            if pc.check(self.model, self.examples, self.pad_id, shared=n):
                self.shared, self.shared_reason = n, f"{n} tokens computed once per batch"
                return
            self.shared_reason = f"differs from the full forward (relative error {pc.check_error:.2e}); off"
            pc = self.prefix = make(0)
        if not pc.check(self.model, self.examples, self.pad_id):
            pc.disable(f"cached path differs from the full forward (relative error {pc.check_error:.2e}); cache off")

    def __exit__(self, *exc: Any) -> None:
        self._restore_weights()
        if self._attn_train:
            self._set_attn(self._attn_orig)

    def for_generation(self) -> Any:
        """Context for generation between steps (dev checks): the model's own attention kernel."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            if self._attn_train:
                self._set_attn(self._attn_orig)
            try:
                yield
            finally:
                if self._attn_train:
                    self._set_attn(self._attn_train)
        return ctx()

    def collate(self, idx: list[int]) -> dict[str, Any]:
        import torch

        b = collate(self.examples, idx, self.pad_id, prefix=self.prefix)
        if "prefix_hidden" in b:
            b["prefix_start"] = torch.full((len(idx),), self.prefix.start, dtype=torch.long)  # type: ignore[union-attr]
            if self.shared:
                b["shared_prefix"] = torch.full((len(idx),), self.shared, dtype=torch.long)
        return {k: v.to(self.device) for k, v in b.items()}

    def describe(self) -> dict[str, Any]:
        return {"frozen_prefix_cache": self.prefix.reason if self.prefix else "off",
                "bf16_frozen_weights": f"{self.n_cast} linear weights" if getattr(self, "n_cast", 0) else "off",
                "train_attention": self._attn_train or f"unchanged ({self._attn_orig})",
                "shared_prompt_prefix": self.shared_reason, "malloc": self.malloc,
                "response_only_logits": self.cfg.response_only_logits, "group_by_length": self.cfg.group_by_length}


def train_step(model: Any, micro_batches: Any, cfg: TrainConfig, optimizer: Any, scheduler: Any, params: list[Any],
               *, device: str, use_bf16: bool, overlap: Any = None) -> tuple[float, dict[str, float], int]:
    """One optimizer step over `micro_batches` (a list of collated batches, one per gradient-accumulation
    micro-batch): forward + backward each, clip, step, schedule. Returns (loss, loss parts, tokens seen)."""
    import torch

    micro_batches = list(micro_batches)
    n = len(micro_batches)
    loss_sum, parts_sum, tokens = 0.0, {}, 0
    for batch in micro_batches:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
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


# ------------------------------------------------------------------------------------------------- dev checks
def dev_prompts(cfg: TrainConfig) -> tuple[list[Record], list[Record]]:
    """Harmful and benign dev prompts (built-in dev splits by default), at most cfg.dev_size each, spread evenly."""
    def take(records: list[Record], n: int) -> list[Record]:
        if len(records) <= n:
            return records
        step = len(records) / n
        return [records[int(i * step)] for i in range(n)]

    harmful = resolve_prompts(cfg.dev_harmful, cfg.prompt_field, None, default_split="dev")
    benign = resolve_prompts(cfg.dev_benign, cfg.prompt_field, None, default_split="dev")
    return take(harmful, cfg.dev_size), take(benign, cfg.dev_size)


def refusal_rates(model: Any, tok: Any, harmful: list[Record], benign: list[Record], max_new_tokens: int,
                  batch_size: int = 16) -> dict[str, float]:
    gens = generate(model, tok, [r.chat() for r in harmful + benign],
                    GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size), desc="dev check",
                    progress=False, decided=keyword_refusal_decided)  # only the opening decides the verdict
    refused = [keyword_refusal(g.text) for g in gens]
    nh = len(harmful)
    return {"harmful_refusal": sum(refused[:nh]) / max(1, nh),
            "benign_refusal": sum(refused[nh:]) / max(1, len(benign))}


def dev_score(rates: dict[str, float], base_benign: float, penalty: float = 3.0, tolerance: float = 0.02) -> float:
    """Harmful refusal, minus `penalty` x every point of benign refusal above the base model's plus `tolerance`."""
    return rates["harmful_refusal"] - penalty * max(0.0, rates["benign_refusal"] - base_benign - tolerance)


# ------------------------------------------------------------------------------------------------- checkpoints
def _trainable_state(model: Any) -> dict[str, Any]:
    """Trained tensors: every trainable parameter and every LoRA tensor (a frozen A is part of the patch too)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}


def _load_trainable(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    best: dict[str, Any] | None) -> None:
    """Trainable weights, optimizer moments and loop state, all safetensors + JSON (no pickle)."""
    from safetensors.torch import save as st_save

    from ..io_utils import atomic_write_bytes

    ck = run_dir / CHECKPOINT_DIR
    ck.mkdir(exist_ok=True)
    tensors = {f"param/{n}": t.contiguous() for n, t in _trainable_state(model).items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt/{pid}/{k}"] = v.detach().reshape(v.shape).contiguous() if v.ndim else v.reshape(1)
    if best is not None:
        tensors.update({f"best/{n}": t.contiguous() for n, t in best["state"].items()})
    atomic_write_bytes(ck / "state.safetensors", st_save(tensors))
    meta = dict(state, scheduler=scheduler.state_dict(),
                opt_param_groups=opt["param_groups"],
                best={k: v for k, v in (best or {}).items() if k != "state"} if best else None)
    atomic_write_json(ck / "state.json", meta)


def load_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], dict | None]:
    import torch
    from safetensors.torch import load_file

    ck = run_dir / CHECKPOINT_DIR
    meta = json.loads((ck / "state.json").read_text())
    tensors = load_file(ck / "state.safetensors")
    _load_trainable(model, {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = v if name != "step" else v.reshape(())
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["opt_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    best = None
    if meta.get("best"):
        best = dict(meta["best"], state={k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")})
    torch.manual_seed(meta.get("seed", 0) + meta["step"])
    return meta, best


# ------------------------------------------------------------------------------------------------- main loop
def _use_bf16(cfg: TrainConfig, device: str) -> bool:
    import torch

    if cfg.bf16 == "yes":
        return True
    if cfg.bf16 == "no":
        return False
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:  # CPUs with native bf16 dot products (AVX512-BF16 / AMX) run autocast matmuls ~2x faster
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepare_model(cfg: TrainConfig, model: Any) -> Any:
    """Make the right parameters trainable: a fresh LoRA patch, or the selected layers for full fine-tuning."""
    from ..modeling.loading import decoder_layers
    from ..patches.artifact import attach_new_patch

    if cfg.method == "lora":
        return attach_new_patch(model, cfg.shape(), seed=cfg.seed)
    layers = set(parse_layers(cfg.layers, num_layers(model)))
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(decoder_layers(model)):
        if i in layers:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True, model_and_tok: tuple[Any, Any] | None = None,
          base_model_meta: dict[str, Any] | None = None) -> TrainResult:
    """Train a patch (or a fully fine-tuned model) into `run_dir`; see the module docstring for the objective.

    `base_model_meta` (spec, fingerprint, ...) replaces what patch.json records as the base model, for a patch
    trained on top of others merged into the weights (red-teaming rounds): it still applies to the true base."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg.validate()
    run = claim_output_dir(run_dir, resume=resume, marker="train_config.json")
    out_name = "patch" if cfg.method == "lora" else "model"
    if (run / out_name).exists():
        raise FileExistsError(f"{run / out_name} already exists: this run finished; choose a new --out")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    t0 = time.time()
    model, tok = model_and_tok or load_model(cfg.model)
    model.to(device)
    examples, data_meta, sources = build_examples(cfg, model, tok)
    if (run / "train_config.json").exists() and resume:
        saved = json.loads((run / "train_config.json").read_text())
        now = to_dict(cfg)
        # speed-path fields added after a run was started do not make its recipe different
        if saved != {k: v for k, v in now.items() if k in saved or k not in _SPEED_FIELDS}:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                          and (k in saved or k not in _SPEED_FIELDS))
            raise ValueError(f"{run}: --resume with a different recipe (fields {diff}); use the same flags")
    atomic_write_json(run / "train_config.json", to_dict(cfg))
    model = prepare_model(cfg, model)
    if cfg.init in ("contrast", "lda") and cfg.method == "lora" and not (run / CHECKPOINT_DIR / "state.json").exists():
        from .lora_init import contrast_init

        if not sources["anchor"]:
            raise ValueError(f"init '{cfg.init}' needs benign prompts: set --benign")
        sep = contrast_init(model, tok, sources["refusal"], sources["anchor"], lda=cfg.init == "lda")
        data_meta["init"] = {"method": cfg.init, "fisher_separation": sep}
    if cfg.freeze_a and cfg.method == "lora":
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    overlap = None
    if cfg.overlap_beta > 0:
        from .regularizer import OverlapPenalty

        overlap = OverlapPenalty(model, cfg.overlap_k, cfg.overlap_side, cfg.overlap_variant)
        if cfg.method == "lora" and cfg.freeze_a and cfg.overlap_side in ("row", "both"):
            import sys

            # measured on the embedded model (docs/geometry.md): side 'both', beta 1, frozen LDA A -> no refusal learnt
            print(f"warning: overlap_side={cfg.overlap_side} with a frozen A: dW V_k = B (A V_k) can only shrink "
                  "by shrinking B, so the row penalty fights the patch itself; use --overlap-side column or "
                  "--freeze-a false", file=sys.stderr)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    use_bf16 = _use_bf16(cfg, device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev_h, dev_b = dev_prompts(cfg)
    history: list[dict[str, Any]] = []
    step, tokens_seen, best, base_benign = 0, 0, None, None
    if resume and (run / CHECKPOINT_DIR / "state.json").exists():
        meta, best = load_checkpoint(run, model, optimizer, scheduler)
        step, tokens_seen, history, base_benign = meta["step"], meta["tokens"], meta["history"], meta["base_benign"]
    log_f = open(run / "train_log.jsonl", "a", encoding="utf-8")

    def dev_check() -> bool:
        """Run a dev check; returns True when training should stop (patience exhausted)."""
        nonlocal best, base_benign
        model.eval()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
            with speed.for_generation():
                # batch 64 on CPU too: ~1.6x faster than 16 with the shared-prefix decoding (docs/performance.md)
                rates = refusal_rates(model, tok, dev_h, dev_b, cfg.dev_tokens, batch_size=64)
        model.train()
        if base_benign is None:
            base_benign = rates["benign_refusal"]
        rec = {"step": step, **rates, "score": dev_score(rates, base_benign, cfg.dev_penalty, cfg.dev_tolerance)}
        history.append(rec)
        with open(run / "dev_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if step > 0 and (best is None or rec["score"] > best["score"]):
            best = {**rec, "state": _trainable_state(model)}
        save_checkpoint(run, model, optimizer, scheduler,
                        {"step": step, "tokens": tokens_seen, "history": history, "base_benign": base_benign,
                         "seed": cfg.seed}, best)
        bar.set_postfix_str(f"dev harm {rates['harmful_refusal']:.0%} benign {rates['benign_refusal']:.0%}")
        if cfg.patience and best is not None:
            since = [h for h in history if h["step"] > best["step"]]
            return len(since) >= cfg.patience
        return False

    t_train = time.time()  # the speed paths' set-up (prefix cache) counts as training time
    speed = SpeedPaths(model, cfg, examples, device, use_bf16, pad_id)
    bar = tqdm(total=total_steps, initial=step, desc=f"train ({cfg.method})", disable=not progress)
    try:
        speed.__enter__()
        stop = False
        if step == 0 and cfg.method == "lora":
            dev_check()  # the base model's dev refusal rates: the reference for over-refusal
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * cfg.grad_accum
        while step < total_steps and not stop:
            order = batches(examples, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)[skip:]
            skip = 0
            for k in range(0, len(order), cfg.grad_accum):
                group = order[k: k + cfg.grad_accum]
                loss_sum, parts_sum, n_tok = train_step(model, (speed.collate(idx) for idx in group), cfg, optimizer,
                                                        scheduler, params, device=device, use_bf16=use_bf16,
                                                        overlap=overlap)
                tokens_seen += n_tok
                step += 1
                rec = {"step": step, "loss": round(loss_sum, 5), **{k: round(v, 5) for k, v in parts_sum.items()},
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen, "elapsed_s": round(time.time() - t_train, 2)}
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                bar.update(1)
                bar.set_description(f"train ({cfg.method}) loss {loss_sum:.3f}")
                if step % eval_every == 0 or step == total_steps:
                    if cfg.method == "lora":
                        stop = dev_check()
                if stop or step >= total_steps:
                    break
            epoch += 1
    finally:
        speed.__exit__(None, None, None)  # fp32 weights and the attention kernel back before saving
        bar.close()
        log_f.close()
    train_seconds = time.time() - t_train
    final_loss = rec["loss"] if step else None
    if best is not None:
        _load_trainable(model, best["state"])
    stats = {
        "steps": step, "examples": len(examples), "tokens": tokens_seen, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9), 1), "total_seconds": round(time.time() - t0, 1),
        "final_loss": final_loss, "trainable_parameters": n_trainable, "bf16_autocast": use_bf16, "device": device,
        "speed_paths": speed.describe(),
        "best_dev": {k: v for k, v in best.items() if k != "state"} if best else None,
        "base_dev": history[0] if history else None,
    }
    model.eval()
    if cfg.method == "lora":
        from ..patches.artifact import save_patch

        n = num_layers(model)
        meta = {"base_model": base_model_meta or {"spec": cfg.model}, "recipe": to_dict(cfg),
                "shape": {"rank": cfg.rank, "alpha": cfg.alpha, "target_modules": list(cfg.target_modules),
                          "layers": parse_layers(cfg.layers, n)},
                "data": data_meta, "training": stats}
        save_patch(model, run / "patch", meta, save_dtype=cfg.save_dtype)
        out = run / "patch"
    else:
        out = _save_full(model, tok, run / "model", cfg, data_meta, stats)
    atomic_write_json(run / "train_stats.json", stats)
    return TrainResult(run_dir=run, output_dir=out, stats=stats, history=history, model=model)


def _save_full(model: Any, tok: Any, out: Path, cfg: TrainConfig, data_meta: dict, stats: dict) -> Path:
    import shutil

    from ..io_utils import claim_tmp_dir, commit_dir
    from ..modeling.loading import fingerprint

    tmp = claim_tmp_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "finetune.json", {"base_model": {"spec": cfg.model}, "recipe": to_dict(cfg),
                                                  "data": data_meta, "training": stats,
                                                  "fingerprint": fingerprint(model)})
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
