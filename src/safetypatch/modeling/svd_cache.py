"""Reduced SVDs of a base model's weights, cached on disk per model fingerprint.

`safetypatch_home()/svd/<fingerprint id>/<weight name>.safetensors` (safetensors only, written atomically, checked
against the weight's sha256 on load). Used by the geometry analysis, the orthogonal projection of a patch and the
overlap regularizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import safetypatch_home
from ..io_utils import atomic_write_bytes
from .fingerprints import fingerprint, fingerprint_id

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _weight_sha(w: "torch.Tensor") -> str:
    import torch

    return hashlib.sha256(w.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


class SVDCache:
    """Reduced SVDs (U, S, Vh) of a base model's weights, cached on disk per model fingerprint."""

    def __init__(self, model: Any, root: str | Path | None = None) -> None:
        self.dir = Path(root) if root else safetypatch_home() / "svd" / fingerprint_id(fingerprint(model))

    def path(self, name: str) -> Path:
        return self.dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"

    def get(self, name: str, w0: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """SVD of `w0` (float64), from the cache when it was computed from the same weight."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import save

        sha = _weight_sha(w0)
        f = self.path(name)
        if f.exists():
            try:
                with safe_open(str(f), framework="pt") as fh:
                    if (fh.metadata() or {}).get("sha256") == sha:
                        return tuple(fh.get_tensor(k).double() for k in ("U", "S", "Vh"))  # type: ignore[return-value]
            except Exception as e:  # damaged file: recompute and overwrite
                log.warning("ignoring damaged SVD cache %s: %s", f, e)
        u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
        blob = save({"U": u.float().contiguous(), "S": s.float().contiguous(), "Vh": vh.float().contiguous()},
                    metadata={"sha256": sha, "name": name, "shape": json.dumps(list(w0.shape))})
        atomic_write_bytes(f, blob)
        return u, s, vh
