"""Merging a patch into its base model and back out: in memory (`merge_into` / `unmerge`, through PEFT) and as
merged model directories on disk (`apply_patch` / `unmerge_patch`), where the base is restored bit for bit.

A LoRA patch changes each targeted weight by dW = scale * B @ A; here dW is computed in float64 from the patch's
factors, the same way at merge and at unmerge time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .. import __version__
from ..errors import PatchError
from ..io_utils import atomic_write_json, sha256_file, staged_dir, utc_now
from ..modeling import fingerprint, fingerprint_differences, fingerprint_like, load_model
from .artifact import check_base, load_patch, verify_files
from .ops import lora_deltas, read_adapter
from .schema import OBJ, SHA256, STR, check_fields, read_json_file

if TYPE_CHECKING:
    import torch


def merge_into(model: Any, patch_dir: str | Path, verify: bool = True) -> Any:
    """Attach a patch (checked like `load_patch`) and merge it into the base weights; returns the PeftModel.

    `unmerge(peft_model)` restores the base weights (up to float rounding)."""
    peft_model = load_patch(model, patch_dir, verify=verify)
    peft_model.merge_adapter()
    return peft_model


def unmerge(peft_model: Any) -> Any:
    """Undo `merge_into`: subtract the patch from the base weights again; returns the PeftModel (adapter attached)."""
    peft_model.unmerge_adapter()
    return peft_model


# ------------------------------------------------------------------------------------------ merged model dirs
RESTORE_DIR = "safetypatch_unmerge"  # a sub-directory: serving tools that glob *.safetensors never see it
RESTORE_FILE = "corrections.safetensors"
MERGE_RECORD = {"patch": OBJ, "patch.sha256": SHA256, "unmerge_corrections": OBJ, "unmerge_corrections.file": STR,
                "unmerge_corrections.sha256": STR}


def _delta64(a: "torch.Tensor", b: "torch.Tensor", scale: float) -> "torch.Tensor":
    """dW in float64, computed the same way at merge and unmerge time."""
    import torch

    return (b.to(torch.float64) @ a.to(torch.float64)) * scale


def _bits(t: "torch.Tensor") -> "torch.Tensor":
    """The tensor's raw bits as integers (so -0.0 != 0.0 and NaN == NaN, as a fingerprint sees them)."""
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _patched_weights(model: Any, patch_dir: str | Path, where: str) -> list[tuple[str, Any, "torch.Tensor"]]:
    """[(module name, module, dW float64 in the weight's own layout)] for every module the patch changes; PatchError
    if one does not fit. A fan_in_fan_out patch (GPT-2's Conv1D stores its weight in x out) gets dW^T, as PEFT
    merges it."""
    modules = dict(model.named_modules())
    config, tensors = read_adapter(patch_dir)
    transpose = bool(config.get("fan_in_fan_out"))
    out = []
    for name, (a, b, s) in lora_deltas((config, tensors), fan_in_fan_out_ok=True).items():
        mod = modules.get(name)
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if mod is None or getattr(mod, "weight", None) is None or tuple(mod.weight.shape) != shape:
            raise PatchError(f"{where}: has no weight {name} of shape {shape} for this patch")
        dw = _delta64(a, b, s)
        out.append((name, mod, dw.T if transpose else dw))
    return out


def _merge_weights(model: Any, patch_dir: str | Path, where: str) -> dict[str, "torch.Tensor"]:
    """W <- W + dW (float64, rounded once) for every patched weight, in place; returns the correction tensors: the
    index and original value of each element that W + dW - dW would not give back bit for bit."""
    import torch

    corrections: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod, dw in _patched_weights(model, patch_dir, where):
            w = mod.weight.data
            merged = (w.to(torch.float64) + dw).to(w.dtype)
            if bool((~torch.isfinite(merged) & torch.isfinite(w)).any()):
                raise PatchError(f"merge: {name}.weight + the patch's update is beyond the range of {w.dtype} (|dW| up "
                                 f"to {float(dw.abs().max()):.3g}); nothing was written")
            restored = (merged.to(torch.float64) - dw).to(w.dtype)
            lost = (_bits(restored) != _bits(w)).reshape(-1).nonzero().squeeze(1)
            if lost.numel():
                corrections[f"{name}.weight.index"] = lost.to(torch.int64)
                corrections[f"{name}.weight.value"] = w.reshape(-1)[lost].clone()
            w.copy_(merged)
    return corrections


def _save_model_dir(tmp: Path, model: Any, tok: Any) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def apply_patch(model_spec: str, patch_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a merged model directory (safetensors + tokenizer + merged_from.json) atomically; returns its path.

    Each targeted weight becomes W + dW (dW in float64, rounded once to the weight's dtype). Rounding makes
    W + dW - dW differ from W in the last bit for some elements (wherever W + dW needs a coarser float grid
    than W, the lost bit cannot be recovered from the merged weight alone), so the original bits of exactly
    those elements are kept in `safetypatch_unmerge/corrections.safetensors` (index, value pairs). With it,
    `unmerge_patch` restores the base bit for bit, so its fingerprint matches again."""
    from safetensors.torch import save_file

    meta = verify_files(patch_dir)
    with staged_dir(out_dir, overwrite) as tmp:
        model, tok = load_model(model_spec)
        check_base(meta, model, patch_dir)
        base_fp = fingerprint(model)
        corrections = _merge_weights(model, patch_dir, str(model_spec))
        _save_model_dir(tmp, model, tok)
        (tmp / RESTORE_DIR).mkdir()
        save_file(corrections, str(tmp / RESTORE_DIR / RESTORE_FILE), metadata={"format": "pt"})
        n_fixed = sum(v.numel() for k, v in corrections.items() if k.endswith(".index"))
        atomic_write_json(tmp / "merged_from.json", {
            "created": utc_now(), "safetypatch_version": __version__,
            "base_model": {"spec": model_spec, "fingerprint": base_fp},
            "patch": {"path": str(patch_dir), "sha256": meta["weights"]["sha256"], "shape": meta.get("shape")},
            "unmerge_corrections": {"file": f"{RESTORE_DIR}/{RESTORE_FILE}", "elements": n_fixed,
                                    "sha256": sha256_file(tmp / RESTORE_DIR / RESTORE_FILE)},
        })
    return Path(out_dir)


def _merge_record(merged_spec: str, patch_dir: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The merged model's merged_from.json ({} if it has none); PatchError if it names another patch."""
    path = Path(merged_spec) / "merged_from.json"
    if not path.exists():
        return {}
    rec = read_json_file(path)
    check_fields(rec, MERGE_RECORD, ("patch.sha256",), str(path))
    if rec["patch"]["sha256"] != meta["weights"]["sha256"]:
        raise PatchError(f"{merged_spec}: merged_from.json says it was merged with patch "
                         f"{rec['patch']['sha256'][:16]}..., not {patch_dir} ({meta['weights']['sha256'][:16]}...)")
    return rec


def _read_corrections(merged_dir: Path, rec: Mapping[str, Any]) -> tuple[dict[str, "torch.Tensor"], bool]:
    """(the merge's correction tensors, whether the unmerge can be exact): checked against merged_from.json."""
    from safetensors.torch import load_file

    info = rec.get("unmerge_corrections") or {}
    path = merged_dir / str(info.get("file", f"{RESTORE_DIR}/{RESTORE_FILE}"))
    if not info or not path.is_file():
        return {}, False
    if sha256_file(path) != info.get("sha256"):
        raise PatchError(f"{path}: sha256 does not match merged_from.json (edited or damaged)")
    try:
        return load_file(str(path)), True
    except Exception as e:  # safetensors raises its own error types
        raise PatchError(f"{path}: not a readable safetensors file ({e})") from None


def _unmerge_weights(model: Any, patch_dir: str | Path, where: str, corrections: Mapping[str, "torch.Tensor"]
                     ) -> float:
    """W <- W - dW for every patched weight, in place, with the merge's corrections put back; returns max |dW|."""
    import torch

    largest = 0.0
    with torch.no_grad():
        for name, mod, dw in _patched_weights(model, patch_dir, where):
            w = mod.weight.data
            restored = (w.to(torch.float64) - dw).to(w.dtype)
            index = corrections.get(f"{name}.weight.index")
            if index is not None:
                restored.view(-1)[index] = corrections[f"{name}.weight.value"].to(w.dtype)
            w.copy_(restored)
            largest = max(largest, float(dw.abs().max()))
    return largest


def unmerge_patch(merged_spec: str, patch_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Subtract a patch's exact update dW (from its factors) from a merged model and write the restored base model.

    Refuses a model that `merged_from.json` says was merged with another patch. For a model merged by
    `apply_patch`, its correction file makes the restored weights equal the base's bit for bit (same fingerprint);
    for a model merged elsewhere the weights are back up to float rounding. `unmerged_from.json` records which,
    and whether the restored fingerprint matches the base fingerprint named in the patch."""
    meta = verify_files(patch_dir)
    rec = _merge_record(merged_spec, patch_dir, meta)
    corrections, exact = _read_corrections(Path(merged_spec), rec)
    with staged_dir(out_dir, overwrite) as tmp:
        model, tok = load_model(merged_spec)
        largest = _unmerge_weights(model, patch_dir, str(merged_spec), corrections)
        _save_model_dir(tmp, model, tok)
        want_fp = meta.get("base_model", {}).get("fingerprint")
        restored_fp = fingerprint_like(model, want_fp) if want_fp else fingerprint(model)
        atomic_write_json(tmp / "unmerged_from.json", {
            "created": utc_now(), "safetypatch_version": __version__, "merged_model": str(merged_spec),
            "patch": {"path": str(patch_dir), "sha256": meta["weights"]["sha256"]},
            "largest_change": largest, "exact": exact,
            "base_fingerprint_in_patch": want_fp, "restored_fingerprint": restored_fp,
            "fingerprint_matches_patch_base": bool(want_fp) and not fingerprint_differences(want_fp, restored_fp),
        })
    return Path(out_dir)
