"""Fingerprints of base models: what a patch records about the model it was made for, and checks on load.

A fingerprint names the architecture, the shapes and sizes, and a sha256 of weight samples; two models with the same
fingerprint are taken to be the same base. `fingerprint_id` is its short key (the SVD cache's directory name).
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..errors import ModelError
from .architecture import num_layers
from .compat import unwrap_lm

_FP_SAMPLE = 4096  # version 1: elements hashed from the start of each of three probe tensors
_FP_STRIDED = 1024  # version 2: evenly spaced elements hashed from every weight matrix
FINGERPRINT_VERSION = 2


def fingerprint(model: Any, version: int = FINGERPRINT_VERSION) -> dict[str, Any]:
    """Identify a base model: architecture, shapes, and a hash of weight samples.

    Version 2 (the default) hashes up to 1,024 evenly spaced elements of every weight matrix, so a model that
    differs in any one of them (a merged patch on a few middle layers, say) gets another fingerprint. Version 1,
    which older patches record, hashed the first 4,096 elements of three matrices only; `fingerprint_like` computes
    it to check those patches. Cheap (no full pass over the weights) and stable across dtype-preserving save/load.
    A PEFT model is fingerprinted by its base weights (LoRA layers are skipped), so a patched model has its base's
    fingerprint.
    """
    import torch

    if version not in (1, 2):
        raise ModelError(f"unknown fingerprint version {version} (this safetypatch knows 1 and 2)")
    base = unwrap_lm(model)
    sd = {k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    names = sorted(sd)
    shapes = hashlib.sha256("\n".join(f"{n}:{tuple(sd[n].shape)}" for n in names).encode()).hexdigest()
    probes = [n for n in names if n.endswith(".weight") and sd[n].ndim == 2]
    if version == 1:
        probes = sorted({probes[0], probes[len(probes) // 2], probes[-1]}) if probes else []
    h = hashlib.sha256()
    for n in probes:
        flat = sd[n].detach().reshape(-1)
        flat = flat[:_FP_SAMPLE] if version == 1 else flat[:: max(1, flat.numel() // _FP_STRIDED)][:_FP_STRIDED]
        h.update(n.encode())
        h.update(flat.to(torch.float32).cpu().contiguous().numpy().tobytes())
    cfg = base.config
    fp: dict[str, Any] = {} if version == 1 else {"fingerprint_version": version}
    return {
        **fp,
        "architecture": (getattr(cfg, "architectures", None) or [type(base).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": num_layers(base),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "num_parameters": int(sum(v.numel() for v in sd.values())),
        "shapes_sha256": shapes,
        "weights_sha256": h.hexdigest(),
    }


def fingerprint_like(model: Any, recorded: dict[str, Any]) -> dict[str, Any]:
    """`model`'s fingerprint in the version of a recorded one (patches made before version 2 record version 1)."""
    return fingerprint(model, version=int(recorded.get("fingerprint_version", 1)))


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short stable key of a fingerprint (16 hex digits)."""
    return hashlib.sha256(repr(sorted(fp.items())).encode()).hexdigest()[:16]


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprints (empty when they match). Fingerprints of
    different versions hash different weight samples: then only the rest (architecture, shapes, sizes) is compared."""
    out = []
    keys = set(expected) | set(actual)
    if expected.get("fingerprint_version", 1) != actual.get("fingerprint_version", 1):
        keys -= {"fingerprint_version", "weights_sha256"}
    for k in sorted(keys):
        if expected.get(k) != actual.get(k):
            out.append(f"{k}: patch was trained on {expected.get(k)!r}, this model has {actual.get(k)!r}")
    return out
