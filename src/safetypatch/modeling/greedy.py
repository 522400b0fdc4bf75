"""The hand greedy decoder behind `generate` (one piece: the shared-prefix KV cache, the growing KV-cache layer and
the batch loop in which finished rows leave), and left padding, which both of `generate`'s paths use.

Greedy decoding by hand: the chat prefix every prompt shares (system prompt, turn header) is run once and its KV
cache copied into each batch, and a sequence that has emitted its end-of-turn token leaves the batch at once instead
of being padded along until the longest answer ends. The arithmetic per token is model.generate's (same forward,
argmax), so greedy outputs match it token for token up to float rounding of differently shaped batches.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ..data.chat import common_prefix_length
from .compat import cache_keyword, unwrap_lm

_GROWING_CACHE = True  # the hand loop's KV cache appends into preallocated storage (see growing_layer_class)


def left_pad(rows: list[list[int]], pad: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask), both long [len(rows), longest row]: each row right-aligned after `pad` tokens."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def shared_prefix(encoded: list[list[int]]) -> list[int]:
    """Longest token prefix common to all prompts (two or more), leaving at least one token of each outside it."""
    return encoded[0][: common_prefix_length(encoded)] if len(encoded) >= 2 else []


def model_cache_kw(model: Any) -> str:
    """The keyword the model's forward takes its KV cache under (`cache` in transformers >= 5.x)."""
    forward = unwrap_lm(model).forward  # bound; wrappers such as variants.FinetunedPair hand it through
    return cache_keyword(getattr(forward, "__func__", forward))


def prefix_kv_cache(model: Any, prefix: list[int], device: Any) -> Any:
    """The KV cache of the shared prefix, computed once (copied into each batch by `greedy_batch`)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{model_cache_kw(model): cache})
    return cache


@functools.lru_cache(maxsize=None)
def growing_layer_class() -> Any:
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


def use_growing_layers(cache: Any, room: int) -> None:
    """Swap each plain `DynamicLayer` of `cache` for a `GrowingLayer` holding the same states (see above)."""
    from transformers.cache_utils import DynamicLayer

    cls = growing_layer_class()
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


def greedy_batch(model: Any, rows: list[list[int]], prefix: list[int], prefix_cache: Any, max_new: int,
                 stop: list[int], pad: int, device: Any, decided: Callable[[list[int]], bool] | None = None,
                 record: list[tuple[list[int], Any]] | None = None) -> list[list[int]]:
    """Greedy continuation of `prompts = prefix + rows[i]`, batched with left padding between the shared prefix
    and each suffix; finished rows leave the batch, and so do rows for which `decided(new tokens)` holds.
    Returns the new tokens of each row (stop token included). `record`: gets (rows alive, their float32 logits)
    per step (the start-up check's)."""
    import copy

    import torch
    from transformers import DynamicCache

    b, p = len(rows), len(prefix)
    ids, suffix_mask = left_pad(rows, pad)
    mask = torch.cat([torch.ones((b, p), dtype=torch.long), suffix_mask], dim=1)  # the prefix, then each row
    ids, mask = ids.to(device), mask.to(device)
    if p:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(b)
    else:
        cache = DynamicCache(config=model.config)
    if _GROWING_CACHE:
        use_growing_layers(cache, max_new)  # the prompt itself is reserved for at its first update
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what model.generate derives from the attention mask
    pos = pos.masked_fill(mask == 0, 1)[:, p:]
    out: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))
    stop_t = torch.tensor(stop, device=device)
    cache_kw = model_cache_kw(model)
    step_in, step_pos = ids, pos
    with torch.no_grad():
        for t in range(max_new):
            logits = model(input_ids=step_in, attention_mask=mask, position_ids=step_pos, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
            if record is not None:
                record.append((list(alive), logits.float().clone()))
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


_VERIFIED: Any = None  # weakref.WeakKeyDictionary: model -> {autocast on: None (equal) or why not}


def greedy_check(model: Any, prompts: list[list[int]], pad: int, device: Any, new_tokens: int = 4) -> str | None:
    """Whether the hand loop equals the model's own forward for this model, checked once per model object (and
    autocast setting): two of the shortest `prompts`, `new_tokens` greedy tokens through the shared-prefix cache,
    left padding, the growing cache and a row leaving the batch, against the model's own forward on each whole
    sequence without a cache. None if every step's logits agree (max |diff| <= tol * max |logit|, tol 1e-3, or
    5e-2 under bf16) and every token is the reference's argmax (or within the difference of a tie); else why."""
    import weakref

    import torch

    global _VERIFIED
    _VERIFIED = _VERIFIED if _VERIFIED is not None else weakref.WeakKeyDictionary()
    low = torch.is_autocast_enabled(torch.device(device).type) or any(
        p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    memo = _VERIFIED.setdefault(model, {})
    if low not in memo:
        memo[low] = _greedy_difference(model, prompts, pad, device, new_tokens, 5e-2 if low else 1e-3)
    return memo[low]


def _greedy_difference(model: Any, prompts: list[list[int]], pad: int, device: Any, new_tokens: int, tol: float
                       ) -> str | None:
    import torch

    rows = sorted(prompts, key=len)[:2]
    rows = rows if len(rows) == 2 else rows * 2
    prefix = shared_prefix(rows)
    fired: list[bool] = []

    def leave(toks: list[int]) -> bool:  # the first row to reach 2 tokens leaves the batch
        if len(toks) == 2 and not fired:
            fired.append(True)
            return True
        return False

    record: list[tuple[list[int], Any]] = []
    try:
        cache = prefix_kv_cache(model, prefix, device) if prefix else None
        out = greedy_batch(model, [r[len(prefix):] for r in rows], prefix, cache, new_tokens, [-1], pad, device,
                           leave, record)
        with torch.no_grad():
            for i, row in enumerate(rows):
                full = torch.tensor([row + out[i][:-1]], device=device)
                ref = model(input_ids=full, use_cache=False).logits[0, len(row) - 1:].float()
                got = torch.stack([lg[alive.index(i)] for alive, lg in record if i in alive])
                err = float((got - ref).abs().max())
                scale = float(ref.abs().max().clamp_min(1.0))
                top = ref.topk(2, dim=-1).values
                ties = (top[:, 0] - top[:, 1]) <= 2 * err
                wrong = (ref.argmax(-1) != torch.tensor(out[i], device=ref.device)) & ~ties
                if err > tol * scale or bool(wrong.any()):
                    return (f"its logits differ from the model's own forward by up to {err / scale:.1e} of their "
                            f"scale (tolerance {tol:g}), tokens {out[i]} vs {ref.argmax(-1).tolist()}")
    except Exception as e:  # noqa: BLE001 - the hand loop cannot run this architecture
        return f"it raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None
