"""The patch artifact: a PEFT adapter directory plus `patch.json` (base fingerprint, recipe, data hashes, sha256 of
the adapter weights, training statistics, evaluation summary).

`peft.PeftModel.from_pretrained(base, patch_dir)` loads a patch without safetypatch. `load_patch` adds the checks:
the weights' sha256 and the base model's fingerprint must match, and only safetensors weights are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from .. import __version__
from ..config import PatchShape, parse_layers
from ..errors import ConfigError, PatchError
from ..io_utils import atomic_write_json, sha256_file, staged_dir, update_json, utc_now
from ..modeling import (fingerprint, fingerprint_differences, fingerprint_like, is_role, num_layers,
                        resolve_targets)
from .finite import check_finite, check_stored_finite, require_finite, to_storage
from .schema import check_fits, check_meta, check_plain_lora, parse_json, read_adapter_config, read_json_file

PATCH_META = "patch.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FORMAT = "safetypatch/1"
SAVE_CAUSE = "the trained weights (training diverged: lower --lr, check --alpha and the data)"
T = TypeVar("T")


def lora_config(shape: PatchShape, model: Any) -> Any:
    """peft.LoraConfig for a patch shape on `model`: roles resolved to module names (`modeling.resolve_targets`),
    `fan_in_fan_out` for GPT-2-style Conv1D targets, the layer selection as `layers_to_transform` (with
    `layers_pattern` only where PEFT's default, the first numbered path part, would not find the layer index).
    `model` may be a layer count instead, for raw module names only (ConfigError for a role)."""
    from peft import LoraConfig

    if isinstance(model, int):
        roles = [t for t in shape.target_modules if is_role(t)]
        if roles:
            raise ConfigError(f"target_modules {roles}: roles are resolved against a model; give the model, not a "
                              "layer count")
        n_layers, targets, conv1d, stack = model, list(shape.target_modules), False, ""
    else:
        res = resolve_targets(model, shape.target_modules)
        n_layers, targets, conv1d, stack = num_layers(model), res.modules, res.conv1d, res.layers_path
    layers = parse_layers(shape.layers, n_layers)
    subset = len(layers) != n_layers
    parts = stack.split(".") if stack else []
    pattern = parts[-1] if subset and (len(parts) == 1 or any(p.isdigit() for p in parts)) else None
    return LoraConfig(
        r=shape.rank,
        lora_alpha=shape.alpha,
        lora_dropout=shape.dropout,
        target_modules=targets,
        layers_to_transform=layers if subset else None,
        layers_pattern=pattern,
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_new_patch(model: Any, shape: PatchShape, seed: int = 0) -> Any:
    """Wrap a base model in a fresh, trainable LoRA patch (PEFT's default init: B = 0, so it starts as a no-op)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    cfg = lora_config(shape, model)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. target modules not found in this architecture
        raise PatchError(f"cannot place a patch on {type(model).__name__}: {e}") from None


def shape_record(shape: PatchShape, model: Any) -> dict[str, Any]:
    """patch.json's `shape`: rank, alpha, `target_modules` as requested (roles or raw names), `resolved_modules`
    (request -> the module names it resolved to on `model`) and the layer indices."""
    res = resolve_targets(model, shape.target_modules)
    return {"rank": shape.rank, "alpha": shape.alpha, "target_modules": list(shape.target_modules),
            "resolved_modules": res.resolved, "layers": parse_layers(shape.layers, num_layers(model))}


def weights_record(weights: Path, dtype: str) -> dict[str, Any]:
    """patch.json's `weights` entry for an adapter's weights file: name, sha256, size in bytes, dtype(s)."""
    return {"file": ADAPTER_WEIGHTS, "sha256": sha256_file(weights), "bytes": weights.stat().st_size, "dtype": dtype}


def save_patch(peft_model: Any, out_dir: str | Path, meta: dict[str, Any], save_dtype: str = "float32",
               overwrite: bool = False, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the adapter and patch.json into a temp dir, fsync, then rename into place (never a half patch).
    Weights that are not finite, or overflow `save_dtype`, are refused (PatchError) and nothing is written.

    `state_dict`: the model's full state dict gathered from sharded ranks (FSDP / ZeRO-3), whose adapter tensors
    are saved instead of the model's own (shards); then `meta["base_model"]` must carry the base's fingerprint,
    taken before sharding."""
    import torch
    from safetensors.torch import save_file

    with staged_dir(out_dir, overwrite) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        require_finite(read_json_file(tmp / ADAPTER_CONFIG).get("lora_alpha", 8), "lora_alpha (--alpha)", "save")
        weights = tmp / ADAPTER_WEIGHTS
        tensors = read_weights(weights)
        if save_dtype != "float32":
            dtype = getattr(torch, save_dtype)
            tensors = {k: to_storage(v, dtype, k, "save", SAVE_CAUSE).contiguous() for k, v in tensors.items()}
            save_file(tensors, weights, metadata={"format": "pt"})
        check_finite(tensors, "save", SAVE_CAUSE)
        full = dict(meta)
        full.setdefault("format", FORMAT)
        full.setdefault("created", utc_now())
        full.setdefault("safetypatch_version", __version__)
        full["weights"] = weights_record(weights, save_dtype)
        # a caller that trained on a modified base (red-teaming: earlier patches merged in) names the true base
        base = full.get("base_model", {})
        full["base_model"] = {"fingerprint": base.get("fingerprint") or fingerprint(peft_model), **base}
        atomic_write_json(tmp / PATCH_META, full)
    return full


def read_weights(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file; PatchError if it is not a readable one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise PatchError(f"{path}: not a readable safetensors file ({str(e)[:200]}); the weights were truncated or "
                         "damaged: restore the patch from a copy") from None


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, from its header; PatchError if it is not a readable one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise PatchError(f"{path}: not a readable safetensors file ({str(e)[:200]}); the weights were truncated or "
                         "damaged: restore the patch from a copy") from None


def read_meta(patch_dir: str | Path) -> dict[str, Any]:
    """The patch.json of a patch directory; PatchError if the directory, or its patch.json, is missing or damaged."""
    p = Path(patch_dir)
    if not p.is_dir():
        raise PatchError(f"{p}: no such patch directory")
    meta_file = p / PATCH_META
    if not meta_file.exists():
        raise PatchError(f"{p}: no {PATCH_META}, so this is not a safetypatch patch. A plain PEFT adapter loads with "
                         f"peft itself (PeftModel.from_pretrained(base, '{p}')); safetypatch needs the {PATCH_META} "
                         "that `safetypatch train` writes beside the adapter (base-model fingerprint, weights sha256)")
    return check_meta(read_json_file(meta_file), str(meta_file))


def check_adapter_dir(patch_dir: str | Path) -> Path:
    """An adapter directory with its config and safetensors weights, and no pickle files; else PatchError."""
    p = Path(patch_dir)
    if not p.is_dir():
        raise PatchError(f"{p}: no such patch directory")
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise PatchError(f"{p}: holds pickle file(s) {pickles}; safetypatch loads weights from safetensors only")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (p / name).is_file():
            raise PatchError(f"{p}: no {name}" + (" (a directory is in its place)" if (p / name).exists() else ""))
    return p


def verify_files(patch_dir: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a patch directory on disk: safetensors weights only, config present, patch.json well formed, sha256 as
    recorded, and the stored weights finite. Returns patch.json."""
    p = check_adapter_dir(patch_dir)
    meta = check_meta(meta, str(p / PATCH_META)) if meta is not None else read_meta(p)
    want = meta["weights"]["sha256"]
    have = sha256_file(p / ADAPTER_WEIGHTS)
    if want != have:
        raise PatchError(f"{p / ADAPTER_WEIGHTS}: sha256 {have[:16]}... does not match {want[:16]}... "
                         "recorded in patch.json: the weights were truncated or edited")
    check_stored_finite(read_weights(p / ADAPTER_WEIGHTS), str(p / ADAPTER_WEIGHTS))
    return meta


def check_base(meta: dict[str, Any], model: Any, patch_dir: str | Path = "") -> None:
    """PatchError listing the differences if `model` is not the base model patch.json's fingerprint names."""
    want = meta.get("base_model", {}).get("fingerprint")
    if not want:
        raise PatchError(f"{patch_dir}: patch.json records no base-model fingerprint")
    diffs = fingerprint_differences(want, fingerprint_like(model, want))
    if diffs:
        raise PatchError(f"{patch_dir}: this patch was made for another base model:\n  " + "\n  ".join(diffs))


def load_patch(model: Any, patch_dir: str | Path, verify: bool = True, is_trainable: bool = False,
               adapter_name: str = "default") -> Any:
    """Attach a patch to `model` after checking its weights' sha256 and the base fingerprint (with `verify`), its
    adapter_config.json against the weights, and that the weights are finite (always)."""
    from peft import PeftModel

    p = Path(patch_dir)
    if verify:
        meta = verify_files(p)  # the stored weights are finite too
        check_base(meta, model, p)
    else:
        check_adapter_dir(p)
        check_stored_finite(read_weights(p / ADAPTER_WEIGHTS), str(p / ADAPTER_WEIGHTS))
    config = read_adapter_config(p / ADAPTER_CONFIG)
    check_plain_lora(config, str(p / ADAPTER_CONFIG))
    check_fits(config, weight_shapes(p / ADAPTER_WEIGHTS), str(p / ADAPTER_CONFIG))
    try:
        return PeftModel.from_pretrained(model, str(p), is_trainable=is_trainable, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise PatchError(f"{p}: does not fit this model (made for another architecture or size?): "
                         f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None


def update_meta(patch_dir: str | Path, change: Callable[[dict[str, Any]], T]) -> T:
    """Read-modify-write a patch's patch.json: `change(meta)` edits it in place (its result is returned). Under an
    exclusive lock (`.patch.json.lock` beside it) and written atomically, so concurrent updates (evaluations
    recorded by several processes, a calibration) are serialised and none is lost. The weights are untouched."""
    p = Path(patch_dir)
    read_meta(p)  # a missing or damaged patch.json: PatchError before anything is locked or written
    where = str(p / PATCH_META)

    def checked(meta: dict[str, Any]) -> T:
        result = change(meta)
        check_meta(meta, f"{where} (as updated)")
        return result

    try:
        return update_json(p / PATCH_META, checked, parse=lambda data: check_meta(parse_json(data, where), where))
    except PermissionError as e:
        raise PatchError(f"{where}: cannot update it ({e.strerror}); make the patch directory writable, or work on a "
                         "copy of the patch") from None


def record_evaluation(patch_dir: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append an evaluation record (the patch certificate: what was run, judged how, the numbers, when) to
    patch.json's `evaluations` list, through `update_meta` (locked, atomic; the weights' sha256 is untouched)."""
    record = {"date": utc_now(), **entry}
    update_meta(patch_dir, lambda meta: meta.__setitem__("evaluations", [*meta.get("evaluations", []), record]))
    return record


record_certificate = record_evaluation  # the name issue #5 uses


def record_calibration(patch_dir: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Set patch.json's `calibration` to `record` through `update_meta` (locked, atomic); returns the record."""
    update_meta(patch_dir, lambda meta: meta.__setitem__("calibration", record))
    return record


def patch_info(patch_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """A summary of a patch for `safetypatch patch info`, after `verify_files` (sha256, safetensors only, finite
    weights) unless `verify` is False; `verified` says which."""
    meta = verify_files(patch_dir) if verify else read_meta(patch_dir)
    shape = meta.get("shape", {})
    return {
        "path": str(patch_dir),
        "created": meta.get("created"),
        "base": meta.get("base_model", {}).get("spec"),
        "base_fingerprint": meta.get("base_model", {}).get("fingerprint", {}).get("weights_sha256", "")[:16],
        "rank": shape.get("rank"), "alpha": shape.get("alpha"),
        "modules": shape.get("target_modules"), "resolved_modules": shape.get("resolved_modules"),
        "layers": shape.get("layers"),
        "bytes": meta.get("weights", {}).get("bytes"), "sha256": meta.get("weights", {}).get("sha256"),
        "verified": verify,
        "training": meta.get("training", {}), "evaluations": meta.get("evaluations", []),
        "calibration": meta.get("calibration"),
    }
