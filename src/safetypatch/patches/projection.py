"""Orthogonal projection of a patch: remove the part of dW that lies in the base weight's top-k singular subspace.

For each patched weight W0 = U S V^T (top-k left / right singular vectors U_k, V_k):
    column side: dW' = (I - U_k U_k^T) dW        (the update writes nothing into W0's main output directions)
    row side:    dW' = dW (I - V_k V_k^T)        (the update reads nothing from W0's main input directions)
    both:        dW' = (I - U_k U_k^T) dW (I - V_k V_k^T)
The projection of a rank-r dW has rank <= r, so it is refactored exactly into rank-r LoRA factors by SVD
(B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, with the patch's alpha / r folded into B). The result is a normal patch
with its own patch.json recording where it came from and how much of the update's energy it kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, PatchError
from ..modeling import SVDCache, load_model
from .artifact import check_base, verify_files
from .finite import to_storage
from .ops import lora_deltas, peft_key, read_adapter, write_adapter_dir

SIDES = ("column", "row", "both")


def project_update(dw: "Any", u_k: "Any", v_k: "Any", side: str) -> "Any":
    """dW with its top-k column and/or row subspace removed (float64 in, float64 out)."""
    if side not in SIDES:
        raise ConfigError(f"side must be one of {SIDES}, got {side!r}")
    out = dw
    if side in ("column", "both"):
        out = out - u_k @ (u_k.T @ out)
    if side in ("row", "both"):
        out = out - (out @ v_k) @ v_k.T
    return out


def refactor(dw: "Any", rank: int, scale: float) -> tuple["Any", "Any"]:
    """(A, B) of rank `rank` with scale * B @ A equal to the best rank-`rank` approximation of dW."""
    import torch

    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root) / scale
    a = root[:, None] * vh[:rank]
    return a, b


def project_patch(patch_dir: str | Path, model: Any, k: int, out_dir: str | Path, side: str = "both",
                  overwrite: bool = False) -> dict[str, Any]:
    """Write the projected patch to `out_dir`; `model` is the base model (or a spec to load). Returns patch.json."""
    import torch

    if side not in SIDES:
        raise ConfigError(f"--side must be one of {SIDES}, got {side!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--k must be an integer >= 1 (the size of the protected subspace), got {k!r}")
    meta = verify_files(patch_dir)
    if isinstance(model, str):
        model, _ = load_model(model)
    check_base(meta, model, patch_dir)
    config, tensors = read_adapter(patch_dir)
    cache = SVDCache(model)
    weights = dict(model.named_parameters())
    new_tensors: dict[str, Any] = {}
    kept_num = total = 0.0
    # keep the source patch's storage dtype (float16 by default), so a projected patch is no larger than its source
    store = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    transpose = bool(config.get("fan_in_fan_out"))  # GPT-2's Conv1D stores W0 as in x out; dW is out x in
    for module, (a, b, scale) in lora_deltas((config, tensors), fan_in_fan_out_ok=True).items():
        w0 = weights.get(f"{module}.weight")
        if w0 is None:
            raise PatchError(f"{patch_dir}: the base model has no weight {module}.weight")
        w0 = w0.detach().float()
        u, _, vh = cache.get(module, w0.T if transpose else w0)
        dw = scale * (b.double() @ a.double())
        kk = min(k, u.shape[1])
        proj = project_update(dw, u[:, :kk].double(), vh[:kk].T.double(), side)
        total += float(dw.pow(2).sum())
        kept_num += float(proj.pow(2).sum())
        new_a, new_b = refactor(proj, a.shape[0], scale)
        for ab, t in (("A", new_a), ("B", new_b)):
            key = peft_key(module, ab)
            new_tensors[key] = to_storage(t, store, key, "project", f"projecting {patch_dir}").contiguous()
    new_meta = {key: meta[key] for key in ("base_model", "shape", "recipe") if key in meta}
    new_meta["derived_from"] = {"path": str(patch_dir), "sha256": meta["weights"]["sha256"], "operation": "project",
                                "k": k, "side": side, "retained_energy": kept_num / total if total else 0.0}
    written = write_adapter_dir(out_dir, config, new_tensors, new_meta, overwrite=overwrite, op="project",
                                cause=f"projecting {patch_dir}")
    assert written is not None
    return written
