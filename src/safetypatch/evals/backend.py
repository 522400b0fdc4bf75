"""The evaluation's backend: the base model with a patch attached (or a fully fine-tuned model paired with its base),
wrapped in a `modeling.backends` backend. Patches are attached here, on the caller's side of the backend, because
modeling sits below patches and never loads one itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.templates import template_mismatch, warn_once
from ..modeling import FinetunedPair, load_model
from ..modeling.backends import TransformersBackend, VLLMBackend
from ..patches import PATCH_META, check_adapter_dir, load_patch, read_meta


def transformers_backend(model: Any, tok: Any, patch: str | Path | None = None, finetuned: str | None = None,
                         device: str | None = None) -> TransformersBackend:
    """A loaded base model as a backend: with `patch` attached (checked against the base first), or paired with
    the fine-tuned model `finetuned` (its variant "patched"), or alone (base only)."""
    if patch is not None:
        model = load_patch(model, patch)
        warn_template_mismatch(patch, tok)
    elif finetuned is not None:
        model = FinetunedPair(model, load_model(finetuned, device=device)[0])
    return TransformersBackend(model, tok)


def warn_template_mismatch(patch: str | Path, tok: Any) -> None:
    """One warning line (per patch and process) when the patch's patch.json records a chat template other than
    the one `tok` formats with, naming both and the --chat-template value to pass (nothing without a patch.json)."""
    if not (Path(patch) / PATCH_META).is_file():
        return
    msg = template_mismatch(read_meta(patch).get("chat_template"), tok, str(patch))
    if msg is not None:
        warn_once(("patch-template", str(patch), msg), msg)


def vllm_backend(model: str = "default", patch: str | Path | None = None, **kwargs: Any) -> VLLMBackend:
    """vLLM over the base model `model`, serving `patch` (an adapter directory, checked here) as a LoRA."""
    return VLLMBackend(model, patch=check_adapter_dir(patch) if patch is not None else None, **kwargs)
