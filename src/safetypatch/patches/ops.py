"""Exact operations on LoRA adapters: read their deltas, write adapter directories, stack patches, scale a patch.
(Merging into a base model, and merged model directories, are in `merge.py`.)

A LoRA patch changes each targeted weight by dW = scale * B @ A. Stacking concatenates the parts' ranks, so the
stacked patch's dW is exactly sum_i w_i dW_i (no SVD, no approximation): A = [A_1; A_2; ...] and
B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] with the new scale 1 (lora_alpha = r). Modules with fewer total ranks than
the largest are padded with zero rows / columns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .. import __version__
from ..errors import PatchError
from ..io_utils import atomic_write_json, staged_dir, utc_now
from ..modeling import fingerprint_differences
from .artifact import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, PATCH_META, check_adapter_dir, read_weights,
                       verify_files, weights_record)
from .finite import check_finite, check_stored_finite, require_finite, to_storage
from .schema import LORA_KEY, check_fits, check_plain_lora, module_scale, read_adapter_config

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"^(?P<head>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<idx>\d+)(?P<tail>\..+)$")

AdapterState = tuple[dict[str, Any], dict[str, "torch.Tensor"]]  # (adapter_config, tensors)
Delta = tuple["torch.Tensor", "torch.Tensor", float]  # (A: r x in, B: out x r, scale)


# ------------------------------------------------------------------------------------------------ reading
def read_adapter(patch_dir: str | Path) -> AdapterState:
    """adapter_config.json and the adapter's tensors (safetensors only) of a patch or plain PEFT adapter dir;
    PatchError for a damaged config (or one that does not match the weights), unreadable weights, or weights that
    are not finite."""
    p = check_adapter_dir(patch_dir)
    config = read_adapter_config(p / ADAPTER_CONFIG)
    tensors = read_weights(p / ADAPTER_WEIGHTS)
    check_stored_finite(tensors, str(p / ADAPTER_WEIGHTS))
    check_fits(config, {k: tuple(v.shape) for k, v in tensors.items()}, str(p / ADAPTER_CONFIG))
    return config, tensors


def _check_plain_lora(config: Mapping[str, Any], where: str, fan_in_fan_out_ok: bool) -> None:
    check_plain_lora(config, where)
    if config.get("fan_in_fan_out") and not fan_in_fan_out_ok:
        raise PatchError(f"{where}: a fan_in_fan_out patch (GPT-2-style Conv1D modules, which store their weight "
                         "transposed, in x out); this operation does not handle that layout yet")


def lora_deltas(patch_dir_or_state: str | Path | AdapterState, fan_in_fan_out_ok: bool = False
                ) -> dict[str, Delta]:
    """{module name: (A, B, scale)} with dW = scale * B @ A (out x in, nn.Linear's layout); module names as in the
    base model (e.g. `model.layers.1.mlp.up_proj`). Accepts a patch directory or an (adapter_config, tensors) pair.

    A fan_in_fan_out adapter (PEFT on GPT-2's Conv1D, whose weight is stored in x out, so W += dW^T) is refused
    unless `fan_in_fan_out_ok`: callers that apply dW to a weight must transpose it for those modules."""
    if isinstance(patch_dir_or_state, (str, Path)):
        where = str(patch_dir_or_state)
        config, tensors = read_adapter(patch_dir_or_state)
    else:
        where = "adapter"
        config, tensors = patch_dir_or_state
    _check_plain_lora(config, where, fan_in_fan_out_ok)
    parts: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        if not m:
            raise PatchError(f"{where}: holds a weight that is not a LoRA factor ({key}; modules_to_save or trainable "
                             "tokens?); only plain LoRA patches are supported here")
        parts.setdefault(m["module"], {})[m["ab"]] = t
    out: dict[str, Delta] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise PatchError(f"{where}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise PatchError(f"{where}: module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit")
        out[module] = (a, b, module_scale(config, module, a.shape[0]))
    if not out:
        raise PatchError(f"{where}: no LoRA weights (lora_A / lora_B) found")
    return out


def delta_weights(patch_dir_or_state: str | Path | AdapterState, fan_in_fan_out_ok: bool = False
                  ) -> dict[str, "torch.Tensor"]:
    """{module name: dW} in float32 (out x in, as nn.Linear stores its weight; a Conv1D stores dW^T)."""
    import torch

    deltas = lora_deltas(patch_dir_or_state, fan_in_fan_out_ok)
    return {m: s * (b.to(torch.float32) @ a.to(torch.float32)) for m, (a, b, s) in deltas.items()}


def layer_of(module: str) -> int | None:
    """Decoder-layer index in a module name (`model.layers.3.mlp.up_proj` -> 3), None outside the layers."""
    m = _LAYER.match(module)
    return int(m["idx"]) if m else None


def leaf_of(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def in_layer_path(module: str) -> str:
    """A module's path inside its decoder layer (`model.layers.3.mlp.up_proj` -> `mlp.up_proj`); the full name for
    a module outside the layers."""
    m = _LAYER.match(module)
    return m["tail"][1:] if m else module


def peft_targets(config: Mapping[str, Any], modules: Sequence[str]) -> list[str]:
    """PEFT `target_modules` that name exactly `modules` (with the layer selection): the adapter config's own list
    when it has one (it was resolved against the model, so GPT-2's bare `c_proj` is there only when both c_proj
    modules are patched), else each module's path inside its layer (`mlp.c_proj`), which names no sibling."""
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        return sorted(set(targets))
    return sorted({in_layer_path(m) for m in modules})


# ------------------------------------------------------------------------------------------------ writing
def peft_key(module: str, ab: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{ab}.weight"


def adapter_tensors(deltas: Mapping[str, tuple["torch.Tensor", "torch.Tensor"]]) -> dict[str, "torch.Tensor"]:
    """PEFT-named tensors from {module: (A, B)}."""
    out = {}
    for module, (a, b) in deltas.items():
        out[peft_key(module, "A")] = a.contiguous()
        out[peft_key(module, "B")] = b.contiguous()
    return out


def write_adapter_dir(out_dir: str | Path, config: Mapping[str, Any], tensors: Mapping[str, "torch.Tensor"],
                      meta: Mapping[str, Any] | None = None, overwrite: bool = False, op: str = "write",
                      cause: str = "the source patch") -> dict[str, Any] | None:
    """Write adapter_config.json + adapter_model.safetensors (+ patch.json when `meta` is given) atomically.

    Refuses (PatchError naming `op` and `cause`, nothing written) tensors or a lora_alpha that are not finite.
    patch.json gets `format`, `created` and `weights` {file, sha256, bytes, dtype} filled in; returns it."""
    from safetensors.torch import save_file

    check_finite(tensors, op, cause)
    require_finite(config.get("lora_alpha", 8), "lora_alpha", op)
    full = None
    with staged_dir(out_dir, overwrite) as tmp:
        atomic_write_json(tmp / ADAPTER_CONFIG, dict(config))
        weights = tmp / ADAPTER_WEIGHTS
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
        if meta is not None:
            dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
            full = {"format": FORMAT, "created": utc_now(), "safetypatch_version": __version__, **meta}
            full["weights"] = weights_record(weights, ",".join(dtypes))
            atomic_write_json(tmp / PATCH_META, full)
    return full


def _shape_meta(config: Mapping[str, Any], modules: Sequence[str], parts: Sequence[Mapping[str, Any]] = ()
                ) -> dict[str, Any]:
    """A stacked patch's `shape`: the union of the parts' requested targets and what they resolved to when every
    part records them (roles survive a stack), else the PEFT target names."""
    layers = sorted({i for i in (layer_of(m) for m in modules) if i is not None})
    shape: dict[str, Any] = {"rank": config["r"], "alpha": config["lora_alpha"],
                             "target_modules": list(config["target_modules"]), "layers": layers}
    shapes = [p.get("shape") or {} for p in parts]
    if shapes and all(isinstance(s.get("resolved_modules"), dict) for s in shapes):
        resolved: dict[str, list[str]] = {}
        for s in shapes:
            for request, names in s["resolved_modules"].items():
                resolved[request] = sorted(set(resolved.get(request, [])) | set(names))
        shape.update(target_modules=sorted(resolved), resolved_modules=resolved)
    return shape


# ------------------------------------------------------------------------------------------------ stacking
def _part_meta(path: Path) -> dict[str, Any]:
    meta = verify_files(path)
    if not meta.get("base_model", {}).get("fingerprint"):
        raise PatchError(f"{path}: patch.json records no base-model fingerprint; cannot check the parts share a base")
    return meta


def _check_same_base(metas: Sequence[dict[str, Any]], paths: Sequence[Path]) -> None:
    first = metas[0]["base_model"]["fingerprint"]
    for meta, path in zip(metas[1:], paths[1:]):
        diffs = fingerprint_differences(first, meta["base_model"]["fingerprint"])
        if diffs:
            lines = [d.replace("patch was trained on", "first part has").replace("this model has", "this part has")
                     for d in diffs]
            raise PatchError(f"cannot stack {path} with {paths[0]}: they were made for different base models:\n  "
                             + "\n  ".join(lines))


def _expand_modules(modules: set[str], n_layers: int | None) -> tuple[set[str], list[int] | None]:
    """All modules PEFT creates for union(target_modules) x union(layers) (so absent ones can be zero-filled),
    and the `layers_to_transform` value (None when every layer is covered or modules sit outside the layers)."""
    layers = sorted({i for i in (layer_of(m) for m in modules) if i is not None})
    if not layers or any(layer_of(m) is None for m in modules):
        return set(modules), None
    templates = {(m["head"], m["tail"]) for m in map(_LAYER.match, modules) if m}
    full = {f"{head}{i}{tail}" for head, tail in templates for i in layers}
    return full, (None if n_layers is not None and layers == list(range(n_layers)) else layers)


def _concat(blk: Sequence[tuple["torch.Tensor", "torch.Tensor"]], rank: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    a = torch.cat([x for x, _ in blk], dim=0)
    b = torch.cat([y for _, y in blk], dim=1)
    pad = rank - a.shape[0]
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a, b


def _zeros_for(module: str, blocks: Mapping[str, Any], rank: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Zero A / B for a module PEFT creates (union of targets x union of layers) that no part patches."""
    import torch

    tail = _LAYER.match(module)["tail"]  # type: ignore[index]
    twin = next(m for m in sorted(blocks) if (t := _LAYER.match(m)) and t["tail"] == tail)
    a, b = blocks[twin][0]
    return torch.zeros(rank, a.shape[1]), torch.zeros(b.shape[0], rank)


def _stacked_config(configs: Sequence[Mapping[str, Any]], rank: int, modules: Sequence[str],
                    layers: list[int] | None) -> dict[str, Any]:
    """The stacked adapter_config: the first part's, with one rank, scale 1 and the union of the parts' targets
    (each part's list names exactly its modules, so the union names the union over the union of layers)."""
    lists = [c.get("target_modules") for c in configs]
    if all(isinstance(t, list) and t for t in lists):
        targets = sorted({t for ts in lists for t in ts})
    else:
        targets = sorted({in_layer_path(m) for m in modules})
    pattern = next((c.get("layers_pattern") for c in configs if c.get("layers_pattern")), None)
    config = dict(configs[0])
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False, target_modules=targets,
                  layers_to_transform=layers, layers_pattern=pattern if layers is not None else None,
                  modules_to_save=None, lora_dropout=0.0, inference_mode=True)
    return config


def stack_patches(paths: Sequence[str | Path], weights: Sequence[float] | None, out_dir: str | Path,
                  overwrite: bool = False) -> dict[str, Any]:
    """One patch whose update is exactly sum_i weights[i] * dW_i (ranks concatenated; no SVD). Returns patch.json.

    All parts must be safetypatch patches for the same base model (same fingerprint)."""
    import torch

    paths = [Path(p) for p in paths]
    if not paths:
        raise PatchError("stack: give at least one patch")
    weights = [1.0] * len(paths) if weights is None else [require_finite(w, f"weight {i + 1}", "stack")
                                                          for i, w in enumerate(weights)]
    if len(weights) != len(paths):
        raise PatchError(f"stack: {len(weights)} weight(s) for {len(paths)} patch(es)")
    metas = [_part_meta(p) for p in paths]
    _check_same_base(metas, paths)
    configs: list[dict[str, Any]] = []
    blocks: dict[str, list[tuple[Any, Any]]] = {}  # module -> [(A, w * scale * B), ...]
    for path, w in zip(paths, weights):
        config, tensors = read_adapter(path)
        configs.append(config)
        if bool(config.get("fan_in_fan_out")) != bool(configs[0].get("fan_in_fan_out")):
            raise PatchError(f"stack: {path} and {paths[0]} disagree on fan_in_fan_out (Conv1D layout)")
        for module, (a, b, s) in lora_deltas((config, tensors), fan_in_fan_out_ok=True).items():
            blk = blocks.setdefault(module, [])
            blk.append((a.to(torch.float32), b.to(torch.float32) * (w * s)))
            if blk[0][0].shape[1] != a.shape[1] or blk[0][1].shape[0] != b.shape[0]:
                raise PatchError(f"stack: module {module} has different shapes in {paths[0]} and {path}")
    n_layers = metas[0]["base_model"]["fingerprint"].get("num_layers")
    modules, layers_to_transform = _expand_modules(set(blocks), n_layers)
    rank = max(sum(a.shape[0] for a, _ in blk) for blk in blocks.values())
    stacked = {m: _concat(blocks[m], rank) if m in blocks else _zeros_for(m, blocks, rank) for m in sorted(modules)}
    config = _stacked_config(configs, rank, sorted(modules), layers_to_transform)
    meta = {
        "base_model": metas[0]["base_model"],
        "shape": _shape_meta(config, sorted(modules), metas),
        "stack": [{"path": str(p), "sha256": m["weights"]["sha256"], "weight": w}
                  for p, m, w in zip(paths, metas, weights)],
    }
    written = write_adapter_dir(out_dir, config, adapter_tensors(stacked), meta, overwrite=overwrite, op="stack",
                                cause=f"the weights {', '.join(f'{w:g}' for w in weights)} of {len(paths)} patch(es)")
    assert written is not None
    return written


# ------------------------------------------------------------------------------------------------ scaling
def scale_patch(path: str | Path, factor: float, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """The same patch with every dW multiplied by `factor` (folded into lora_B). Returns the new patch.json."""
    import torch

    factor = require_finite(factor, "factor", "scale")
    path = Path(path)
    meta = verify_files(path)
    config, tensors = read_adapter(path)
    lora_deltas((config, tensors), fan_in_fan_out_ok=True)  # refuses anything that is not a plain LoRA adapter
    scaled = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        scaled[key] = (to_storage(t.to(torch.float32) * factor, t.dtype, key, "scale", f"the factor {factor:g}")
                       if m and m["ab"] == "B" else t)
    new_meta = {k: meta[k] for k in ("base_model", "shape", "stack") if k in meta}
    new_meta.update(scaled_from={"path": str(path), "sha256": meta["weights"]["sha256"]}, factor=factor)
    written = write_adapter_dir(out_dir, config, scaled, new_meta, overwrite=overwrite, op="scale",
                                cause=f"the factor {factor:g}")
    assert written is not None
    return written
