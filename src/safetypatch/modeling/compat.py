"""Small shims over transformers / PEFT API differences between the versions safetypatch supports, and checks of
what this machine has (bf16, devices)."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

from ..errors import ConfigError


def unwrap_lm(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=None)
def as_out_in(module: Any, w: Any) -> Any:
    """`w` (a weight of `module`, or a difference of two) as out x in, like PEFT's B @ A: GPT-2's Conv1D stores its
    weight in x out, so it is transposed; any other module's is returned as it is."""
    return w.T if type(module).__name__ == "Conv1D" else w


def params(fn: Any) -> frozenset[str]:
    """Parameter names of a transformers function (looked up once: these are called every step)."""
    return frozenset(inspect.signature(fn).parameters)


def cache_keyword(fn: Any) -> str:
    """`cache` (transformers >= 5.x) or `past_key_values` (before, and deprecated after), whichever `fn` takes."""
    return "cache" if "cache" in params(fn) else "past_key_values"


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation (gradient) checkpointing on every decoder layer: transformers 5 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old name warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def bf16_supported(device: str) -> bool:
    """Whether bf16 autocast runs natively on `device`: a CUDA GPU with bf16, or a CPU with native bf16 dot products
    (AVX512-BF16 / AMX), where autocast matmuls run ~2x faster than fp32."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


def check_device(device: str, flag: str = "--device") -> str:
    """`device` if this machine has it (cpu, cuda, cuda:N, mps, xpu[:N]); else ConfigError naming `flag` and what
    to give instead."""
    m = DEVICE.match(device)
    if not m:
        raise ConfigError(f"{flag} {device!r}: not a device name; give cpu, cuda, cuda:N, mps or xpu")
    kind, index = m.group(1), int(m.group(2)[1:]) if m.group(2) else 0
    if kind == "cpu":
        return device
    import torch

    backend = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}[kind]
    count = 0 if backend is None or not backend.is_available() else getattr(backend, "device_count", lambda: 1)()
    if index >= count:
        have = f"{count} {kind} device(s)" if count else f"no {kind} device"
        raise ConfigError(f"{flag} {device}: this machine has {have}; give cpu" + (f" or {kind}:0" if count else ""))
    return device
