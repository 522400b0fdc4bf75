"""Small shims over transformers / PEFT API differences between the versions safetypatch supports."""

from __future__ import annotations

import functools
import inspect
from typing import Any


def unwrap_lm(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=None)
def params(fn: Any) -> frozenset[str]:
    """Parameter names of a transformers function (looked up once: these are called every step)."""
    return frozenset(inspect.signature(fn).parameters)


def cache_keyword(fn: Any) -> str:
    """`cache` (transformers >= 5.x) or `past_key_values` (before, and deprecated after), whichever `fn` takes."""
    return "cache" if "cache" in params(fn) else "past_key_values"


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
