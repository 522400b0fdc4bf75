"""The evaluation's backend: the base model with a patch attached (or a fully fine-tuned model paired with its base),
wrapped in a `modeling.backends` backend. Patches are attached here, on the caller's side of the backend, because
modeling sits below patches and never loads one itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..modeling import FinetunedPair, load_model
from ..modeling.backends import TransformersBackend, VLLMBackend
from ..patches import check_adapter_dir, load_patch


def transformers_backend(model: Any, tok: Any, patch: str | Path | None = None, finetuned: str | None = None,
                         device: str | None = None) -> TransformersBackend:
    """A loaded base model as a backend: with `patch` attached (checked against the base first), or paired with
    the fine-tuned model `finetuned` (its variant "patched"), or alone (base only)."""
    if patch is not None:
        model = load_patch(model, patch)
    elif finetuned is not None:
        model = FinetunedPair(model, load_model(finetuned, device=device)[0])
    return TransformersBackend(model, tok)


def vllm_backend(model: str = "default", patch: str | Path | None = None, **kwargs: Any) -> VLLMBackend:
    """vLLM over the base model `model`, serving `patch` (an adapter directory, checked here) as a LoRA."""
    return VLLMBackend(model, patch=check_adapter_dir(patch) if patch is not None else None, **kwargs)
