"""The trainer's speed paths, one algorithm kept together and entered with `with` (docs/performance.md):

- the frozen-prefix cache: the hidden states entering the first trained layer, computed once per example;
- the shared prompt prefix: tokens every example shares run through the trained layers once per batch;
- bf16 copies of frozen linear weights under bf16 autocast (autocast would re-cast them on every call);
- the attention kernel while training, and the CPU allocator setting.

None of them changes the objective: each is checked against the model's own forward at start-up (or is exact by
construction) and `SpeedPaths.describe()` says what is on and why the rest is off.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..data.chat import Encoded
from ..modeling import decoder_layers, unwrap_lm
from .config import TrainConfig, bf16_autocast
from .examples import collate
from .forward import decoder_parts, first_trained_layer, forward_from_layer, run_stack, shared_prefix_length


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
        lm = unwrap_lm(model)
        dec = decoder_parts(lm)
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

    def bottom(self, lm: Any, input_ids: Any, attention_mask: Any) -> Any:
        """Hidden states entering layer `start` for a batch of token ids: the embeddings and the frozen layers."""
        dec = lm.get_decoder()
        return run_stack(dec, list(dec.layers[: self.start]), dec.embed_tokens(input_ids), attention_mask,
                         self.shared)

    def _build(self, model: Any, examples: list[Encoded], pad_id: int, batch_size: int = 16) -> None:
        import torch

        lm = unwrap_lm(model)
        dtype = getattr(torch, self.dtype_name)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        self.states = [None] * len(examples)
        with torch.no_grad(), bf16_autocast(self.device, self.use_bf16):
            for k in range(0, len(order), batch_size):
                idx = order[k: k + batch_size]
                b = collate(examples, idx, pad_id)
                h = self.bottom(lm, b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
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

        lm = unwrap_lm(model)
        idx = list(range(min(4, len(examples))))
        b = collate(examples, idx, pad_id, prefix=self)
        b = {k: v.to(self.device) for k, v in b.items()}
        with torch.no_grad(), bf16_autocast(self.device, self.use_bf16):
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
        self.n_cast = 0

    # -- attention kernel
    def _lm(self) -> Any:
        return unwrap_lm(self.model)

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

    @contextlib.contextmanager
    def for_generation(self) -> Iterator[None]:
        """Context for generation between steps (dev checks): the model's own attention kernel."""
        if self._attn_train:
            self._set_attn(self._attn_orig)
        try:
            yield
        finally:
            if self._attn_train:
                self._set_attn(self._attn_train)

    def collate(self, idx: list[int]) -> dict[str, Any]:
        """The batch of examples `idx` on the device, with what the active speed paths need."""
        import torch

        b = collate(self.examples, idx, self.pad_id, prefix=self.prefix)
        if "prefix_hidden" in b:
            b["prefix_start"] = torch.full((len(idx),), self.prefix.start, dtype=torch.long)  # type: ignore[union-attr]
            if self.shared:
                b["shared_prefix"] = torch.full((len(idx),), self.shared, dtype=torch.long)
        return {k: v.to(self.device) for k, v in b.items()}

    def describe(self) -> dict[str, Any]:
        """What each speed path did (train_stats.json's `speed_paths`)."""
        return {"frozen_prefix_cache": self.prefix.reason if self.prefix else "off",
                "bf16_frozen_weights": f"{self.n_cast} linear weights" if self.n_cast else "off",
                "train_attention": self._attn_train or f"unchanged ({self._attn_orig})",
                "shared_prompt_prefix": self.shared_reason, "malloc": self.malloc,
                "response_only_logits": self.cfg.response_only_logits, "group_by_length": self.cfg.group_by_length}
