"""Batched generation backends. The transformers backend pads on the left and sorts prompts by length so each
batch carries little padding; outputs come back in the caller's order."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import GenerationConfig
from ..data.chat import common_prefix_length, prompt_ids
from .compat import cache_keyword, unwrap_lm

Chat = list[dict[str, str]]


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # new tokens only, without padding or the end-of-turn token
    finished: bool  # ended with the end-of-turn token (not cut at max_new_tokens)


def as_chat(prompt: str | Chat) -> Chat:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _stop_ids(model: Any, tok: Any) -> list[int]:
    ids = {tok.eos_token_id}
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gc_eos, int):
        ids.add(gc_eos)
    elif isinstance(gc_eos, (list, tuple)):
        ids.update(gc_eos)
    return sorted(i for i in ids if i is not None)


# Greedy decoding by hand (the default; the benchmark and tests switch it off to compare with model.generate):
# the chat prefix every prompt shares (system prompt, turn header) is run once and its KV cache copied into each
# batch, and a sequence that has emitted its end-of-turn token leaves the batch at once instead of being padded
# along until the longest answer ends. The arithmetic per token is model.generate's (same forward, argmax), so
# greedy outputs match it token for token up to float rounding of differently shaped batches.
_FAST_GREEDY = True
_GROWING_CACHE = True  # the hand loop's KV cache appends into preallocated storage (see _growing_layer_class)
# logits processors that model.generate would add from the model's generation_config; the hand loop has none
_PROCESSOR_FIELDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                     "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
                     "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                     "sequence_bias": None, "renormalize_logits": False, "exponential_decay_length_penalty": None,
                     "guidance_scale": None, "watermarking_config": None, "epsilon_cutoff": 0.0,
                     "eta_cutoff": 0.0, "diversity_penalty": 0.0, "num_beams": 1}


def _fast_greedy_ok(model: Any, cfg: GenerationConfig) -> bool:
    if not _FAST_GREEDY or cfg.do_sample:
        return False
    gc = getattr(model, "generation_config", None)
    for name, default in _PROCESSOR_FIELDS.items():
        val = getattr(gc, name, default) if gc is not None else default
        if val not in (default, None) and not (name == "min_length" and val == 0):
            return False
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return not getattr(model.config, "is_encoder_decoder", False) and mt is not None


def _shared_prefix(encoded: list[list[int]]) -> list[int]:
    """Longest token prefix common to all prompts (two or more), leaving at least one token of each outside it."""
    return encoded[0][: common_prefix_length(encoded)] if len(encoded) >= 2 else []


def _model_cache_kw(model: Any) -> str:
    """The keyword the model's forward takes its KV cache under (`cache` in transformers >= 5.x)."""
    forward = unwrap_lm(model).forward  # bound; wrappers such as evals.paired.FinetunedPair hand it through
    return cache_keyword(getattr(forward, "__func__", forward))


def _prefix_cache(model: Any, prefix: list[int], device: Any) -> Any:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{_model_cache_kw(model): cache})
    return cache


@functools.lru_cache(maxsize=None)
def _growing_layer_class() -> Any:
    """A `DynamicLayer` that appends into preallocated storage instead of `torch.cat`-ing a new tensor per token.

    transformers' `DynamicLayer.update` concatenates, copying every layer's whole cache at every decoding step
    (16 % of the CPU time of generation on SmolLM2 at batch 64); `StaticLayer` preallocates but attends over its
    full length and cannot drop finished rows. This layer's `keys` / `values` are views of the first `n` slots of
    storage with `room` to spare, so an update writes only the new tokens, and rows leave by indexing the storage.
    The tensors attention sees hold exactly `DynamicLayer`'s values. Written here because transformers has no
    growable cache layer."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, room: int) -> None:
            super().__init__()
            self.room, self.n = room, 0
            self.k_store: Any = None
            self.v_store: Any = None

        def owns_states(self) -> bool:
            """Whether keys / values are still the views of the storage (a base-class method may replace them)."""
            return (self.k_store is not None and self.keys is not None
                    and self.keys.data_ptr() == self.k_store.data_ptr()
                    and tuple(self.keys.shape) == (*self.k_store.shape[:2], self.n, self.k_store.shape[-1]))

        def reserve(self, key_states: Any, value_states: Any) -> None:
            """New storage holding the current states, with room for `key_states` and `room` more tokens."""
            n = self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0
            cap = n + key_states.shape[-2] + self.room
            self.k_store = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
            self.v_store = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
            if n:
                self.k_store[:, :, :n] = self.keys
                self.v_store[:, :, :n] = self.values
            self.n = n

        def views(self) -> tuple[Any, Any]:
            self.keys, self.values = self.k_store[:, :, : self.n], self.v_store[:, :, : self.n]
            return self.keys, self.values

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            t = key_states.shape[-2]
            if not self.owns_states() or self.n + t > self.k_store.shape[-2]:
                self.reserve(key_states, value_states)
            self.k_store[:, :, self.n: self.n + t] = key_states
            self.v_store[:, :, self.n: self.n + t] = value_states
            self.n += t
            return self.views()

        def batch_select_indices(self, indices: Any) -> None:
            if not self.owns_states():
                super().batch_select_indices(indices)
                return
            self.k_store, self.v_store = self.k_store[indices], self.v_store[indices]
            self.views()

    return GrowingLayer


def _use_growing_layers(cache: Any, room: int) -> None:
    """Swap each plain `DynamicLayer` of `cache` for a `GrowingLayer` holding the same states (see above)."""
    from transformers.cache_utils import DynamicLayer

    cls = _growing_layer_class()
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            grown = cls(room)
            if layer.is_initialized:
                grown.lazy_initialization(layer.keys, layer.values)
                grown.keys, grown.values = layer.keys, layer.values
            layer = grown
        layers.append(layer)
    cache.layers = layers


def _greedy_batch(model: Any, rows: list[list[int]], prefix: list[int], prefix_cache: Any, max_new: int,
                  stop: list[int], pad: int, device: Any, decided: Callable[[list[int]], bool] | None = None
                  ) -> list[list[int]]:
    """Greedy continuation of `prompts = prefix + rows[i]`, batched with left padding between the shared prefix
    and each suffix; finished rows leave the batch, and so do rows for which `decided(new tokens)` holds.
    Returns the new tokens of each row (stop token included)."""
    import copy

    import torch
    from transformers import DynamicCache

    b, p = len(rows), len(prefix)
    width = max(len(r) for r in rows)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, p + width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    if p:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(b)
    else:
        cache = DynamicCache(config=model.config)
    if _GROWING_CACHE:
        _use_growing_layers(cache, max_new)  # the prompt itself is reserved for at its first update
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what model.generate derives from the attention mask
    pos = pos.masked_fill(mask == 0, 1)[:, p:]
    out: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))
    stop_t = torch.tensor(stop, device=device)
    cache_kw = _model_cache_kw(model)
    step_in, step_pos = ids, pos
    with torch.no_grad():
        for t in range(max_new):
            logits = model(input_ids=step_in, attention_mask=mask, position_ids=step_pos, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
            nxt = logits.argmax(-1)
            done = torch.isin(nxt, stop_t)
            for j, tok_id in enumerate(nxt.tolist()):
                out[alive[j]].append(tok_id)
                if decided is not None and not done[j] and decided(out[alive[j]]):
                    done[j] = True
            if t == max_new - 1:
                break
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            last_pos = step_pos[:, -1:]
            if keep.numel() < len(alive):  # early exit: finished rows leave the batch
                cache.batch_select_indices(keep)
                mask, nxt, last_pos = mask[keep], nxt[keep], last_pos[keep]
                alive = [alive[j] for j in keep.tolist()]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            step_in, step_pos = nxt[:, None], last_pos + 1
    return out


def _collect(tok: Any, idx: list[int], new: list[list[int]], stop: list[int], results: list[Any]) -> None:
    """Cut each row's new tokens at the first stop token and store its Generation at the caller's index."""
    for row, i in enumerate(idx):
        toks = new[row]
        finished = False
        for j, t in enumerate(toks):
            if t in stop:
                toks, finished = toks[:j], True
                break
        text = tok.decode(toks, skip_special_tokens=True)
        results[i] = Generation(text=text.strip(), token_ids=toks, finished=finished)


def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[str | Chat],
    cfg: GenerationConfig | None = None,
    desc: str = "generating",
    progress: bool = True,
    decided: Callable[[str], bool] | None = None,
) -> list[Generation]:
    """Generate an answer for each prompt (greedy unless cfg.do_sample), batched and length-sorted.

    `decided(partial text)`: with greedy decoding by hand, a row stops as soon as it returns True (a judge whose
    verdict can no longer change, e.g. `judges.keyword_refusal_decided`); its text is then only the opening, and
    `finished` is False. Elsewhere it is ignored and every answer runs to the end."""
    import torch
    from tqdm.auto import tqdm

    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    encoded = [prompt_ids(tok, as_chat(p)) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stop = _stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    batches = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress or len(encoded) < 2, leave=False)
    fast = _fast_greedy_ok(model, cfg)
    prefix = _shared_prefix(encoded) if fast else []
    row_decided = (lambda toks: decided(tok.decode(toks, skip_special_tokens=True))) if decided else None  # noqa: E731
    try:
        # only ever switch bf16 on: an autocast(enabled=False) here would switch off a caller's autocast (the
        # trainer's dev checks run under it with bf16 frozen weights)
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        with amp:
            prefix_cache = _prefix_cache(model, prefix, device) if prefix else None
            for idx in batches:
                if fast:
                    new = _greedy_batch(model, [encoded[i][len(prefix):] for i in idx], prefix, prefix_cache,
                                        cfg.max_new_tokens, stop, pad, device, row_decided)
                    _collect(tok, idx, new, stop, results)
                    bar.update(len(idx))
                    continue
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = encoded[i]
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attn[row, width - len(ids):] = 1
                kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                              pad_token_id=pad, eos_token_id=stop)
                if cfg.do_sample:
                    kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
                else:  # silence warnings about sampling knobs inherited from the model's generation_config
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                with torch.no_grad():
                    out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
                _collect(tok, idx, out[:, width:].tolist(), stop, results)
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]
