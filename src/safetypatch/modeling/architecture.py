"""Where the transformer blocks of a causal LM are, whatever its architecture (and through a PEFT wrapper)."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .compat import unwrap_lm

# attribute paths of the decoder-layer list: Llama-like, GPT-2, OPT-like, GPT-NeoX
LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


def decoder_layers(model: Any) -> Any:
    """The list of transformer blocks of a causal LM (Llama-like `model.model.layers`, GPT-2 `transformer.h`)."""
    base = unwrap_lm(model)
    for path in LAYER_PATHS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise ModelError(f"cannot find the decoder layers of {type(base).__name__}")


def num_layers(model: Any) -> int:
    """The number of decoder layers, from the config (or by counting the blocks)."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(n) if n else len(decoder_layers(model))
