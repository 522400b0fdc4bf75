"""The patch artifact: a PEFT adapter directory plus `patch.json` (base fingerprint, recipe, data hashes, sha256 of
the adapter weights, training statistics, evaluation summary).

`peft.PeftModel.from_pretrained(base, patch_dir)` loads a patch without safetypatch. `load_patch` adds the checks:
the weights' sha256 and the base model's fingerprint must match, and only safetensors weights are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import PatchShape, parse_layers
from ..errors import PatchError
from ..io_utils import atomic_write_json, sha256_file, staged_dir, utc_now
from ..modeling import fingerprint, fingerprint_differences, fingerprint_like, num_layers

PATCH_META = "patch.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FORMAT = "safetypatch/1"


def lora_config(shape: PatchShape, n_layers: int) -> Any:
    """peft.LoraConfig for a patch shape; layer selection becomes `layers_to_transform`."""
    from peft import LoraConfig

    layers = parse_layers(shape.layers, n_layers)
    return LoraConfig(
        r=shape.rank,
        lora_alpha=shape.alpha,
        lora_dropout=shape.dropout,
        target_modules=list(shape.target_modules),
        layers_to_transform=None if len(layers) == n_layers else layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_new_patch(model: Any, shape: PatchShape, seed: int = 0) -> Any:
    """Wrap a base model in a fresh, trainable LoRA patch (PEFT's default init: B = 0, so it starts as a no-op)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    cfg = lora_config(shape, num_layers(model))
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. target modules not found in this architecture
        raise PatchError(f"cannot place a patch on {type(model).__name__}: {e}") from None


def weights_record(weights: Path, dtype: str) -> dict[str, Any]:
    """patch.json's `weights` entry for an adapter's weights file: name, sha256, size in bytes, dtype(s)."""
    return {"file": ADAPTER_WEIGHTS, "sha256": sha256_file(weights), "bytes": weights.stat().st_size, "dtype": dtype}


def save_patch(peft_model: Any, out_dir: str | Path, meta: dict[str, Any], save_dtype: str = "float32",
               overwrite: bool = False) -> dict[str, Any]:
    """Write the adapter and patch.json into a temp dir, fsync, then rename into place (never a half patch)."""
    import torch
    from safetensors.torch import load_file, save_file

    with staged_dir(out_dir, overwrite) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        weights = tmp / ADAPTER_WEIGHTS
        if save_dtype != "float32":
            tensors = {k: v.to(getattr(torch, save_dtype)).contiguous() for k, v in load_file(weights).items()}
            save_file(tensors, weights, metadata={"format": "pt"})
        full = dict(meta)
        full.setdefault("format", FORMAT)
        full.setdefault("created", utc_now())
        full.setdefault("safetypatch_version", __version__)
        full["weights"] = weights_record(weights, save_dtype)
        # a caller that trained on a modified base (red-teaming: earlier patches merged in) names the true base
        full["base_model"] = {"fingerprint": fingerprint(peft_model), **full.get("base_model", {})}
        atomic_write_json(tmp / PATCH_META, full)
    return full


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
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise PatchError(f"{meta_file}: damaged ({e.msg} at line {e.lineno})") from None


def check_adapter_dir(patch_dir: str | Path) -> Path:
    """An adapter directory with its config and safetensors weights, and no pickle files; else PatchError."""
    p = Path(patch_dir)
    if not p.is_dir():
        raise PatchError(f"{p}: no such patch directory")
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise PatchError(f"{p}: holds pickle file(s) {pickles}; safetypatch loads weights from safetensors only")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (p / name).exists():
            raise PatchError(f"{p}: no {name}")
    return p


def verify_files(patch_dir: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a patch directory on disk: safetensors weights only, config present, sha256 as recorded."""
    p = check_adapter_dir(patch_dir)
    meta = meta if meta is not None else read_meta(p)
    want = meta.get("weights", {}).get("sha256")
    have = sha256_file(p / ADAPTER_WEIGHTS)
    if want != have:
        raise PatchError(f"{p / ADAPTER_WEIGHTS}: sha256 {have[:16]}... does not match {want and want[:16]}... "
                         "recorded in patch.json: the weights were truncated or edited")
    try:
        from safetensors import safe_open

        with safe_open(str(p / ADAPTER_WEIGHTS), framework="pt") as f:
            list(f.keys())
    except Exception as e:
        raise PatchError(f"{p / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
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
    """Attach a patch to `model` after checking its weights' sha256 and the base fingerprint."""
    from peft import PeftModel

    p = Path(patch_dir)
    if verify:
        meta = verify_files(p)
        check_base(meta, model, p)
    else:
        check_adapter_dir(p)
    try:
        return PeftModel.from_pretrained(model, str(p), is_trainable=is_trainable, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as e:
        raise PatchError(f"{p}: does not fit this model (rank or shape mismatch?): {str(e).splitlines()[0]}") from None


def record_evaluation(patch_dir: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append an evaluation record (the patch certificate: what was run, judged how, the numbers, when) to
    patch.json's `evaluations` list. patch.json is rewritten atomically; the weights, and so their sha256, are
    untouched."""
    p = Path(patch_dir)
    meta = read_meta(p)
    record = {"date": utc_now(), **entry}
    meta["evaluations"] = [*meta.get("evaluations", []), record]
    atomic_write_json(p / PATCH_META, meta)
    return record


record_certificate = record_evaluation  # the name issue #5 uses


def patch_info(patch_dir: str | Path) -> dict[str, Any]:
    """A summary of a patch for `safetypatch patch info`."""
    meta = read_meta(patch_dir)
    shape = meta.get("shape", {})
    return {
        "path": str(patch_dir),
        "created": meta.get("created"),
        "base": meta.get("base_model", {}).get("spec"),
        "base_fingerprint": meta.get("base_model", {}).get("fingerprint", {}).get("weights_sha256", "")[:16],
        "rank": shape.get("rank"), "alpha": shape.get("alpha"),
        "modules": shape.get("target_modules"), "layers": shape.get("layers"),
        "bytes": meta.get("weights", {}).get("bytes"), "sha256": meta.get("weights", {}).get("sha256"),
        "training": meta.get("training", {}), "evaluations": meta.get("evaluations", []),
        "calibration": meta.get("calibration"),
    }
