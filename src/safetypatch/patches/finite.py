"""Patches with weights that are not finite are never written, and never loaded.

A NaN or infinite weight makes every logit of the patched model NaN, and a certificate would then record "0 %
refusal" for it. Every patch operation (save, stack, scale, project, export) checks its result before writing:
finite, and within the range of the dtype it is stored in (a factor of 1e10 overflows float16). The PatchError
names the operation and what caused it (the factor, a weight, the source patch). Loading checks the stored weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import PatchError

if TYPE_CHECKING:
    import torch


def require_finite(value: Any, name: str, op: str) -> float:
    """`value` as a float; PatchError if it is not a finite number (NaN, inf, a string)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PatchError(f"{op}: {name} {value!r} is not a number; give a finite number") from None
    if not math.isfinite(v):
        raise PatchError(f"{op}: {name} {value!r} is not finite; give a finite number")
    return v


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def to_storage(t: "torch.Tensor", dtype: "torch.dtype", key: str, op: str, cause: str) -> "torch.Tensor":
    """`t` cast to the storage `dtype` (exactly `t.to(dtype)`); PatchError if a value is not finite, or becomes
    infinite because it is beyond the dtype's range."""
    import torch

    check_finite({key: t}, op, cause)
    out = t.to(dtype)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        big = float(t.abs().max())
        raise PatchError(f"{op}: {key} would reach |x| = {big:.3g}, beyond the range of {_dtype_name(dtype)} (largest "
                         f"{torch.finfo(dtype).max:.6g}); caused by {cause}. Nothing was written: use a smaller value")
    return out


def check_finite(tensors: Mapping[str, "torch.Tensor"], op: str, cause: str) -> None:
    """PatchError naming the first tensor with a NaN or infinite value, the operation and its cause."""
    import torch

    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise PatchError(f"{op}: the result is not finite ({key} holds {what} values in {_dtype_name(t.dtype)}); "
                             f"caused by {cause}. Nothing was written")


def check_stored_finite(tensors: Mapping[str, "torch.Tensor"], where: str) -> None:
    """PatchError if a patch's stored weights hold NaN or infinite values (it would make every output NaN)."""
    import torch

    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PatchError(f"{where}: {key} holds NaN or infinite values; this patch would make every output NaN, "
                             "so it is refused: re-create it (train again, or redo the stack / scale that made it)")
