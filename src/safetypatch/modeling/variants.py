"""Base and patched variants of one loaded model: the one switch every comparison uses, and a fully fine-tuned
model seen through the same interface.

`variant(model, "base")` switches a PEFT adapter off (`model.disable_adapter()`), `variant(model, "patched")`
leaves the model as it is; a model without an adapter is its own base.

Every base-versus-patched metric in safetypatch (refusal rates, KL(base || patched) on the base's own answers)
runs on one PEFT model and switches the patch off with `variant(model, "base")`. A full fine-tune has no adapter:
`FinetunedPair` holds both models and routes calls to the fine-tuned one, or to the base inside
`disable_adapter()`, so the same code measures LoRA patches and full fine-tuning alike (docs/geometry.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..errors import ConfigError

VARIANTS = ("base", "patched")


@contextlib.contextmanager
def variant(model: Any, name: str) -> Iterator[Any]:
    """The base model with the patch switched off (`name` "base"), or the patched model as it is ("patched")."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    if name == "base" and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


class FinetunedPair:
    """Behaves like the fine-tuned model; inside `disable_adapter()` like the base model."""

    def __init__(self, base: Any, finetuned: Any) -> None:
        if type(base) is not type(finetuned):
            raise ConfigError(f"the fine-tuned model is a {type(finetuned).__name__}, the base a "
                              f"{type(base).__name__}: give the base the model was fine-tuned from")
        self.__dict__.update(_base=base, _active=finetuned)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        previous = self._active
        self.__dict__["_active"] = self._base
        try:
            yield
        finally:
            self.__dict__["_active"] = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._active(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # config, generate, parameters, eval, ... of the active model
        return getattr(self.__dict__["_active"], name)
