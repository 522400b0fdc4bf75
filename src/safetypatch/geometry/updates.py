"""Weight updates dW to analyse, keyed by (decoder layer, module path inside the layer), each a float64 (out, in)
matrix like PEFT's B @ A: from a LoRA patch (dW = scale * B @ A) or from a fully fine-tuned model (dW = W_ft - W0),
and the base weight W0 each one is compared with. A module outside the decoder layers has layer -1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import ConfigError
from ..modeling import as_out_in, decoder_layers, unwrap_lm
from ..patches import PATCH_META, check_base, lora_deltas, read_meta, verify_files

if TYPE_CHECKING:
    import torch

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")

Key = tuple[int, str]


def split_module_path(path: str) -> Key:
    """'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj'); a module outside the decoder layers -> (-1, path)."""
    m = _LAYER_RE.search(path)
    return (int(m.group(1)), m.group(2)) if m else (-1, path)


def lora_updates(patch_dir: str | Path) -> dict[Key, "torch.Tensor"]:
    """dW = scale * B @ A (float64, shape out x in) per patched module, read through `patches.lora_deltas`; PEFT's
    factors are out x in for GPT-2's Conv1D too (fan_in_fan_out), and `base_weight` turns W0 the same way."""
    return {split_module_path(module): (scale * (b.double() @ a.double())).reshape(b.shape[0], -1)
            for module, (a, b, scale) in lora_deltas(patch_dir, fan_in_fan_out_ok=True).items()}


def _layers_prefix(model: Any) -> str:
    layers = decoder_layers(model)
    return next(n for n, mod in unwrap_lm(model).named_modules() if mod is layers)


def weight_name(model: Any, key: Key) -> str:
    """State-dict name of the weight behind (layer, module)."""
    layer, module = key
    return f"{module}.weight" if layer < 0 else f"{_layers_prefix(model)}.{layer}.{module}.weight"


def base_weight(model: Any, key: Key) -> "torch.Tensor":
    """W0 of (layer, module) as a float64 (out, in) matrix (a PEFT-wrapped module gives its base layer)."""
    layer, module = key
    root = unwrap_lm(model) if layer < 0 else decoder_layers(model)[layer]
    mod = root.get_submodule(module)
    mod = getattr(mod, "base_layer", mod)
    w = as_out_in(mod, mod.weight.detach())
    return w.reshape(w.shape[0], -1).double().cpu()


def full_updates(base_model: Any, finetuned_model: Any, modules: Iterable[str] | None = None
                 ) -> dict[Key, "torch.Tensor"]:
    """dW = W_ft - W0 (float64, out x in) for every 2-D decoder-layer weight that changed.

    `modules` filters by module name: 'up_proj' or 'mlp.up_proj'.
    """
    import torch

    wanted = set(modules) if modules else None
    out: dict[Key, torch.Tensor] = {}
    ft_layers = decoder_layers(finetuned_model)
    for i, layer in enumerate(decoder_layers(base_model)):
        for mod_name, mod in layer.named_modules():
            w0 = getattr(mod, "weight", None)
            if not mod_name or w0 is None or w0.ndim != 2 or "lora_" in mod_name or "base_layer" in mod_name:
                continue
            if wanted and mod_name not in wanted and mod_name.rsplit(".", 1)[-1] not in wanted:
                continue
            ft_mod = ft_layers[i].get_submodule(mod_name)
            w1 = ft_mod.weight.detach()
            if w1.shape != w0.shape:
                raise ConfigError(f"layer {i} {mod_name}: shape {tuple(w1.shape)} != base {tuple(w0.shape)}; give the "
                                  "base model the fine-tuned model was made from")
            if not torch.equal(w1.cpu(), w0.detach().cpu()):
                out[(i, mod_name)] = as_out_in(mod, w1.double().cpu() - w0.detach().double().cpu())
    return out


def patch_updates(model: Any, patch: str | Path, verify: bool = True) -> dict[Key, "torch.Tensor"]:
    """LoRA updates, after checking a safetypatch patch's files (`verify_files`: sha256 as recorded, safetensors
    only, finite weights; skipped when `verify` is False) and its base fingerprint. Plain PEFT adapters (no
    patch.json) are read as is."""
    if (Path(patch) / PATCH_META).exists():
        check_base(verify_files(patch) if verify else read_meta(patch), model, patch)
    return lora_updates(patch)
