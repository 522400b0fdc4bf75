"""The trainer's speed paths, one algorithm kept together and entered with `with` (docs/performance.md):

- the frozen-prefix cache: the hidden states entering the first trained layer, computed once per example;
- the shared prompt prefix: tokens every example shares run through the trained layers once per batch;
- bf16 copies of frozen linear weights under bf16 autocast (autocast would re-cast them on every call);
- the attention kernel while training, and the CPU allocator setting.

None of them changes the objective: at start-up the loss and gradient of the paths that are on are compared with
the model's own forward (training/speed_check.py); a path that makes them differ is switched off with one line
saying why, and `SpeedPaths.describe()` says what is on and why the rest is off.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from ..data.chat import Encoded
from ..modeling import decoder_layers, unwrap_lm
from .config import TrainConfig, bf16_autocast
from .examples import collate
from .forward import (decoder_parts, dropout_reason, first_trained_layer, layer_input, run_stack, shared_prefix_length,
                      sliding_window)


class PrefixCache:
    """Hidden states entering the first trained layer, one tensor per example, computed once (no grad).

    The layers below it and the embeddings are frozen and carry no adapter, so their output for a given example
    never changes during training; every epoch after the first (and the KL anchor's base pass) reuses it. The
    states come from the hand-run stack (`run_stack`, with the shared prompt prefix once per build batch) where
    that equals the model's own forward on a few examples, else from the model's own forward stopped at that layer
    (`layer_input`: embedding scales, absolute positions included). The trainer's start-up check then compares the
    loss and gradient of training from this cache with the model's own forward (training/speed_check.py).
    """

    generic = False  # states from the model's own forward (`layer_input`) rather than the hand-run stack

    def __init__(self, model: Any, examples: list[Encoded], cfg: TrainConfig, device: str, use_bf16: bool,
                 pad_id: int, shared: int = 0, probe: list[int] | None = None, progress: bool = True):
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
        start = first_trained_layer(model)
        why = self._structural_reason(lm, start, max((len(e.input_ids) for e in examples), default=0))
        if why:
            self.reason = why
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
        built_by = self._choose_bottom(lm, examples, pad_id, probe or list(range(min(4, len(examples)))))
        self._build(model, examples, pad_id, progress=progress)
        self.active = True
        self.reason = f"layers 0-{start - 1} cached ({self.megabytes:.1f} MB, {cfg.prefix_cache_dtype}{built_by})"

    @staticmethod
    def _structural_reason(lm: Any, start: int, longest: int) -> str:
        """Why a cached prefix cannot be the same objective here, whatever a few examples show ('' if none)."""
        if decoder_parts(lm) is None:
            return (f"off: {type(lm).__name__} is not a Llama-like decoder (no embed_tokens / layers / norm / "
                    "rotary_emb), so training cannot start at a layer")
        if start == 0:
            return "the first layer is trained: nothing frozen below it"
        drop = dropout_reason(lm, start)
        if drop:
            return f"off: {drop} in the frozen layers: a cached prefix would freeze one dropout sample"
        window = sliding_window(lm.config)
        if window is not None and longest > window:
            return (f"off: sliding-window attention ({window} tokens) and examples up to {longest} tokens; the "
                    "layers above the cache run with a full causal mask")
        return ""

    def _choose_bottom(self, lm: Any, examples: list[Encoded], pad_id: int, idx: list[int]) -> str:
        """Use the hand-run stack if it gives the model's own layer input on examples `idx`, else the model's own
        forward; returns what the reason line says about it."""
        import torch

        b = collate(examples, idx, pad_id)
        ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
        m = mask.bool()
        with torch.no_grad(), bf16_autocast(self.device, self.use_bf16):
            ref = layer_input(lm, self.start, ids, mask).float()[m]
            try:
                err = float((self.bottom(lm, ids, mask).float()[m] - ref).norm() / ref.norm().clamp_min(1e-30))
            except Exception:  # noqa: BLE001 - the hand-run stack does not fit this architecture
                err = float("inf")
        if err <= (1e-2 if self.use_bf16 else 1e-5):
            return ""
        self.generic = True
        return f"; built by the model's own forward: the hand-run embeddings + layers differ by rel {err:.1e}"

    def bottom(self, lm: Any, input_ids: Any, attention_mask: Any) -> Any:
        """Hidden states entering layer `start` for a batch of token ids: the embeddings and the frozen layers."""
        if self.generic:
            return layer_input(lm, self.start, input_ids, attention_mask)
        dec = lm.get_decoder()
        return run_stack(dec, list(dec.layers[: self.start]), dec.embed_tokens(input_ids), attention_mask,
                         self.shared)

    def _build(self, model: Any, examples: list[Encoded], pad_id: int, batch_size: int = 16,
               progress: bool = True) -> None:
        """The states of every example, shortest first in batches; with `progress`, a "prefix cache" bar (stderr)."""
        import torch
        from tqdm.auto import tqdm

        lm = unwrap_lm(model)
        dtype = getattr(torch, self.dtype_name)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        self.states = [None] * len(examples)
        bar = tqdm(total=len(examples), desc=f"prefix cache (layers 0-{self.start - 1})", leave=False,
                   disable=not progress or len(examples) < 2)
        with bar, torch.no_grad(), bf16_autocast(self.device, self.use_bf16):
            for k in range(0, len(order), batch_size):
                idx = order[k: k + batch_size]
                b = collate(examples, idx, pad_id)
                h = self.bottom(lm, b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
                for row, i in enumerate(idx):
                    self.states[i] = h[row, : len(examples[i].input_ids)].to(dtype).clone()
                bar.update(len(idx))

    def batch(self, idx: list[int], width: int) -> Any:
        """Right-padded [B, width, hidden] float32 states for these examples (padding rows are zeros)."""
        import torch

        h = self.states[idx[0]]
        out = torch.zeros((len(idx), width, h.shape[-1]), dtype=torch.float32, device=h.device)
        for row, i in enumerate(idx):
            out[row, : self.states[i].shape[0]] = self.states[i]
        return out

    def disable(self, why: str) -> None:
        self.active, self.states, self.reason = False, [], why


ORDER = ("shared_prompt_prefix", "frozen_prefix_cache", "response_only_logits", "train_attention",
         "bf16_frozen_weights")  # the order in which the start-up check switches paths off


class SpeedPaths:
    """The trainer's speed paths around the training steps (a context manager that restores the model on exit):
    the frozen-prefix cache, the shared prompt prefix, the LM head on response positions only, bf16 copies of
    frozen linear weights under bf16 autocast, and the attention kernel. On entry the start-up check
    (training/speed_check.py) compares their loss and gradient with the model's own forward; while they differ,
    paths are switched off one at a time in ORDER, each with one line saying why (stderr and `describe()`).
    `collate(idx)` builds a batch that uses them; `for_generation()` is a context for dev checks in between.
    With `progress`, the prefix cache's build and the start-up check show bars (stderr). `stepped_aside`: why
    every path (and the check) is off, for an engine that wraps the model (FSDP, DeepSpeed); None keeps them."""

    def __init__(self, model: Any, cfg: TrainConfig, examples: list[Encoded], device: str, use_bf16: bool,
                 pad_id: int, progress: bool = True, stepped_aside: str | None = None):
        self.stepped_aside = stepped_aside
        self.model, self.cfg, self.examples, self.device = model, cfg, examples, device
        self.use_bf16, self.pad_id, self.progress = use_bf16, pad_id, progress
        self.prefix: PrefixCache | None = None
        self.shared = 0
        self.shared_reason = "off"
        self.response_only = cfg.response_only_logits
        self.switched_off: dict[str, str] = {}  # path -> why the start-up check switched it off
        self.checked = "not run"
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
        from .speed_check import SpeedCheck

        if self.cfg.tune_malloc and self.device.split(":")[0] == "cpu":
            from .malloc import tune_malloc

            self.malloc = tune_malloc()
        if self.stepped_aside:
            self.checked = f"not run: {self.stepped_aside}"
            return self
        self._attn_orig = getattr(self._lm().config, "_attn_implementation", None)
        probe = SpeedCheck(self.model, self.cfg, self.examples, self.device, self.use_bf16, self.pad_id)
        if self.cfg.bf16_frozen_weights and self.use_bf16:
            self._cast_frozen()  # before the prefix cache is built: its forward uses them too
        self.n_cast = len(self._saved_weights)
        try:
            self._build_prefix_cache(probe.idx)
            self._attn_train = self._choose_attn()
            try:
                self._set_attn(self._attn_train)
            except (ValueError, ImportError, AttributeError):  # kernel unavailable for this model: keep its own
                self._attn_train = None
            self._verify(probe)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build_prefix_cache(self, probe: list[int]) -> None:
        """Build the frozen-prefix cache, with the shared prompt prefix run once per batch if on."""
        # checkpointed layers run without a key/value cache, which the shared prefix's rows attend to
        share = self.cfg.share_prompt_prefix and not self.cfg.gradient_checkpointing
        n = shared_prefix_length(self.examples) if share else 0
        pc = self.prefix = self._make_cache(n, probe)
        if self.cfg.share_prompt_prefix and self.cfg.gradient_checkpointing:
            self.shared_reason = "off: gradient checkpointing runs the layers without the prefix's key/value cache"
        elif not pc.active:
            self.shared_reason = "needs the frozen-prefix cache" if self.cfg.share_prompt_prefix else "off"
        elif self.cfg.share_prompt_prefix and n == 0:
            self.shared_reason = "the examples share no prompt prefix"
        elif n:
            self.shared, self.shared_reason = n, f"{n} tokens computed once per batch"

    def _make_cache(self, shared: int, probe: list[int]) -> PrefixCache:
        return PrefixCache(self.model, self.examples, self.cfg, self.device, self.use_bf16, self.pad_id,
                           shared=shared, probe=probe, progress=self.progress)

    def _verify(self, probe: Any) -> None:
        """The start-up check: switch paths off in ORDER until loss and gradient equal the model's own forward."""
        from tqdm.auto import tqdm

        with tqdm(total=1, desc="speed check (loss and gradient vs the model's own forward)", leave=False,
                  disable=not self.progress or probe.ref is None) as bar:
            why = probe.check(self.collate)
            bar.update(1)
            for name in ORDER:
                if why is None:
                    break
                if self._is_on(name):
                    bar.total += 1  # one more check, without `name`
                    self._switch_off(name, why, probe.idx)
                    why = probe.check(self.collate)
                    bar.update(1)
        n = len(probe.idx)
        self.checked = (f"loss and gradient equal to the model's own forward on {n} examples" if why is None
                        else f"still differs with every path off: {why}") if probe.ref is not None else "not run"

    def _is_on(self, name: str) -> bool:
        return {"shared_prompt_prefix": self.shared > 0,
                "frozen_prefix_cache": self.prefix is not None and self.prefix.active,
                "response_only_logits": bool(self.response_only),
                "train_attention": self._attn_train is not None, "bf16_frozen_weights": self.n_cast > 0}[name]

    def _switch_off(self, name: str, why: str, probe: list[int]) -> None:
        """Switch path `name` off because of `why`, with one line on stderr (above the start-up check's bar)."""
        from tqdm.auto import tqdm

        self.switched_off[name] = why
        tqdm.write(f"speed path {name} switched off: with it on, {why}", file=sys.stderr)
        line = f"off (start-up check: {why})"
        if name == "shared_prompt_prefix":
            self.prefix = self._make_cache(0, probe)
            self.shared, self.shared_reason = 0, line
        elif name == "frozen_prefix_cache" and self.prefix is not None:
            self.prefix.disable(line)
        elif name == "response_only_logits":
            self.response_only = False
        elif name == "train_attention":
            self._set_attn(self._attn_orig)
            self._attn_train = None
        elif name == "bf16_frozen_weights":
            self._restore_weights()
            self.n_cast = 0

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
        if self.cfg.response_only_logits and not self.response_only:  # switched off by the start-up check
            b["full_logits"] = torch.ones((len(idx),), dtype=torch.long)
        return {k: v.to(self.device) for k, v in b.items()}

    def describe(self) -> dict[str, Any]:
        """What each speed path did (train_stats.json's `speed_paths`); `switched_off`: the start-up check's
        verdicts, one line per path it switched off."""
        off = self.switched_off
        return {"frozen_prefix_cache": self.prefix.reason if self.prefix else "off",
                "bf16_frozen_weights": (f"{self.n_cast} linear weights" if self.n_cast else
                                        f"off (start-up check: {off['bf16_frozen_weights']})"
                                        if "bf16_frozen_weights" in off else "off"),
                "train_attention": (self._attn_train or f"unchanged ({self._attn_orig})"
                                    + (f"; eager off (start-up check: {off['train_attention']})"
                                       if "train_attention" in off else "")),
                "shared_prompt_prefix": self.shared_reason, "malloc": self.malloc,
                "response_only_logits": (f"off (start-up check: {off['response_only_logits']})"
                                         if "response_only_logits" in off else self.cfg.response_only_logits),
                "group_by_length": self.cfg.group_by_length, "check": self.checked,
                "switched_off": {k: f"{k} off: with it on, {v}" for k, v in off.items()}}
