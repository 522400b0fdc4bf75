"""The evaluation's backend: the base model with a patch attached (or a fully fine-tuned model paired with its base),
wrapped in a `modeling.backends` backend. Patches are attached here, on the caller's side of the backend, because
modeling sits below patches and never loads one itself.

`open_eval_backend` is what `eval` (prompt files and suites) calls: `BackendChoice.name` "transformers" (default) or
"vllm". vLLM serves base and patched from ONE engine (patched = with the patch's LoRARequest, base = without) and
generates only; evaluations that also need log-likelihoods or KL (suite entries of type mc, perplexity, kl) get them
from the transformers backend, loaded lazily the first time one is asked for (`ScoringFallback`, one log line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.templates import template_mismatch, warn_once
from ..errors import ConfigError
from ..modeling import Chat, FinetunedPair, Generation, load_model, load_tokenizer
from ..modeling.backends import BACKEND_ALIASES, Backend, TransformersBackend, VLLMBackend
from ..patches import PATCH_META, check_adapter_dir, load_patch, read_meta, verify_files

EVAL_BACKENDS = ("transformers", "vllm")
VLLM_DTYPES = ("float32", "bfloat16", "float16", "auto")


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
    """vLLM over the base model `model`, serving `patch` (an adapter directory, checked here: files, and with a
    patch.json its sha256 and finite weights) as a LoRA; kwargs go to `VLLMBackend`."""
    if patch is not None:
        patch = check_adapter_dir(patch)
        if (patch / PATCH_META).is_file():
            verify_files(patch)
    return VLLMBackend(model, patch=patch, **kwargs)


@dataclass
class BackendChoice:
    """Which backend an evaluation generates with (`--backend`), and the vLLM engine's settings."""

    name: str = "transformers"
    tensor_parallel_size: int = 1  # vLLM: devices the model is split over (passed to LLM when > 1)
    max_lora_rank: int | None = None  # vLLM: None follows the patch's rank
    dtype: str = "float32"  # vLLM: the transformers backend's dtype, so both evaluate the same weights ("auto":
    # the model config's, which vLLM-CPU turns into bfloat16)

    def key(self) -> str:
        """The canonical backend name; ConfigError naming --backend for anything else."""
        key = BACKEND_ALIASES.get(self.name.lower(), self.name.lower())
        if key not in EVAL_BACKENDS:
            raise ConfigError(f"--backend {self.name}: expected one of {', '.join(EVAL_BACKENDS)}")
        return key


def check_backend_choice(choice: BackendChoice, finetuned: str | None = None) -> None:
    """ConfigError, before anything loads, for settings the chosen backend cannot honour."""
    key = choice.key()
    if key == "vllm" and finetuned:
        raise ConfigError("--finetuned with --backend vllm: one vLLM engine serves one base model (the patch as "
                          "a LoRA), not a second full model; use --backend transformers for a fine-tuned model")
    if key != "vllm" and (choice.tensor_parallel_size != 1 or choice.max_lora_rank is not None
                          or choice.dtype != BackendChoice.dtype):
        raise ConfigError("--tensor-parallel, --max-lora-rank and --vllm-dtype configure the vLLM engine; add "
                          "--backend vllm or drop them")


def open_eval_backend(choice: BackendChoice, model: str, patch: str | None = None, chat_template: str = "auto",
                      device: str | None = None, load: Callable[[], tuple[Any, Any]] | None = None,
                      scoring: Sequence[str] = (), log: Callable[[str], None] | None = None) -> Backend:
    """The backend an evaluation runs on. transformers: `load()` (default `load_model`) with `patch` attached.
    vllm: one engine over `model` serving `patch` as a LoRA, prompts encoded with the --chat-template tokenizer;
    with `scoring` (names of entries that need log-likelihoods / KL) wrapped in a ScoringFallback, with one
    `log` line naming them."""
    def load_hf() -> tuple[Any, Any]:
        return load() if load is not None else load_model(model, device=device, chat_template=chat_template)

    if choice.key() == "transformers":
        hf_model, tok = load_hf()
        return transformers_backend(hf_model, tok, patch=patch, device=device)
    engine = vllm_backend(model, patch=patch, max_lora_rank=choice.max_lora_rank,
                          tensor_parallel_size=choice.tensor_parallel_size, dtype=choice.dtype,
                          tok=load_tokenizer(model, chat_template=chat_template))
    if not scoring:
        return engine
    if log is not None:
        log(f"vLLM generates only; entries {', '.join(scoring)} need log-likelihoods / KL: the transformers "
            "backend computes them (loaded when first needed)")
    return ScoringFallback(engine, lambda: transformers_backend(*load_hf(), patch=patch, device=device))


class ScoringFallback(Backend):
    """Generations from `engine` (vLLM); log-likelihoods, rolling log-likelihoods and KL from the backend
    `make_scorer()` builds (transformers, same model and patch), built on the first such call and kept."""

    name = "vllm"

    def __init__(self, engine: Backend, make_scorer: Callable[[], Backend]) -> None:
        self.engine, self.make_scorer = engine, make_scorer
        self.tok = engine.tok
        self.scorer_backend: Backend | None = None

    def scorer(self) -> Backend:
        if self.scorer_backend is None:
            self.scorer_backend = self.make_scorer()
        return self.scorer_backend

    def generate(self, prompts: Sequence[str | Chat], cfg: Any = None, variant: str = "patched",
                 desc: str = "generating", progress: bool = True) -> list[Generation]:
        return self.engine.generate(prompts, cfg, variant=variant, desc=desc, progress=progress)

    def loglikelihood(self, *args: Any, **kwargs: Any) -> list[tuple[float, int]]:
        return self.scorer().loglikelihood(*args, **kwargs)

    def loglikelihood_rolling(self, *args: Any, **kwargs: Any) -> list[tuple[float, int]]:
        return self.scorer().loglikelihood_rolling(*args, **kwargs)

    def kl_to_base(self, *args: Any, **kwargs: Any) -> dict[int, tuple[float, int]]:
        return self.scorer().kl_to_base(*args, **kwargs)
