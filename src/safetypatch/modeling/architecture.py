"""Where the transformer blocks of a causal LM are, whatever its architecture (and through a PEFT wrapper).

The layer stack is looked up at the known attribute paths first (Llama-like `model.layers`, GPT-2 / GPT-J
`transformer.h`, OPT `model.decoder.layers`, GPT-NeoX `gpt_neox.layers`, multimodal `model.language_model.layers`),
then by the generic rule: the `nn.ModuleList` whose length is the config's layer count (`num_hidden_layers`,
`n_layer`, `num_layers` or `n_layers`; the text config's for a multimodal model), the one with the most parameters
when several fit. Its path (relative to the transformers model) gives PEFT its `layers_pattern`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .compat import unwrap_lm

# attribute paths of the decoder-layer list: Llama-like, GPT-2 / GPT-J, OPT-like, GPT-NeoX, multimodal, MPT
LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "model.language_model.layers", "language_model.model.layers", "transformer.blocks")
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def config_layers(config: Any) -> int | None:
    """The decoder-layer count a config gives (its text config's for a multimodal model), or None."""
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        try:
            configs.append(text())
        except (AttributeError, ValueError, TypeError):  # configs without a text part
            pass
    for cfg in configs:
        for name in LAYER_COUNT_FIELDS:
            n = getattr(cfg, name, None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    return None


def _at_path(base: Any, path: str) -> Any:
    obj = base
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layer_stack(model: Any) -> tuple[str, Any]:
    """(path, layers): the decoder-layer `nn.ModuleList` of a causal LM and its attribute path inside the
    transformers model (`model.layers`, `transformer.h`, ...); ModelError naming the model when none is found."""
    import torch

    base = unwrap_lm(model)
    for path in LAYER_PATHS:
        obj = _at_path(base, path)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return path, obj
    n = config_layers(getattr(base, "config", None))
    fits = [(name, mod) for name, mod in base.named_modules()
            if isinstance(mod, torch.nn.ModuleList) and n is not None and len(mod) == n]
    if fits:
        return max(fits, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    lists = [f"{name} ({len(mod)})" for name, mod in base.named_modules() if isinstance(mod, torch.nn.ModuleList)]
    raise ModelError(f"cannot find the decoder layers of {type(base).__name__}: none of {', '.join(LAYER_PATHS)} "
                     f"exists and no module list has the config's layer count ({n}; fields "
                     f"{', '.join(LAYER_COUNT_FIELDS)}); its module lists: {', '.join(lists) or 'none'}")


def decoder_layers(model: Any) -> Any:
    """The list of transformer blocks of a causal LM (see `layer_stack`)."""
    return layer_stack(model)[1]


def layers_path(model: Any) -> str:
    """The attribute path of the decoder-layer list inside the transformers model (`model.layers`)."""
    return layer_stack(model)[0]


def num_layers(model: Any) -> int:
    """The number of decoder layers, from the config (or by counting the blocks)."""
    n = config_layers(getattr(model, "config", None))
    return n if n else len(decoder_layers(model))
