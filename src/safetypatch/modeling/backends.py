"""Backends: one interface over transformers (default) and vLLM with LoRA (optional extra, GPU only) for every
generation and every log-likelihood of an evaluation, in lm-evaluation-harness's split:

- `generate(prompts, cfg, variant)`: answers to chat prompts (lm-eval's `generate_until`);
- `loglikelihood(pairs, variant)`: (sum of log p, tokens) of each continuation given its context (multiple choice);
- `loglikelihood_rolling(texts, variant)`: (sum of log p, predicted tokens) of each whole text (perplexity);
- `kl_to_base(prompts, answers)`: {prompt index: (KL(base || patched) summed over its given answer, tokens)},
  for the non-empty answers, in the order scored (modeling.scoring).

`variant` is "base" (the patch switched off) or "patched" (as loaded): `modeling.variant`, the one switch. A backend
does not load patches: the caller attaches one (safetypatch.patches) before wrapping the model, or hands the vLLM
backend an already-checked adapter directory. A backend raises BackendError for what it cannot compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

from ..config import GenerationConfig
from ..data.chat import prompt_ids
from ..errors import BackendError
from .generation import Chat, Generation, as_chat, generate
from .scoring import MAX_BATCH_TOKENS, answer_kl, rolling_loglikelihoods, score_continuations
from .variants import VARIANTS, variant

VLLM_INSTALL_HINT = "pip install 'safetypatch[vllm]' (Linux with a CUDA GPU)"


class Backend:
    """Generation and scoring, with the patch on ("patched", default) or off ("base"). Subclasses set `name` and
    override what they can compute; the rest raises BackendError naming the backend and the method."""

    name: ClassVar[str] = ""
    tok: Any = None  # the tokenizer prompts are encoded with

    def unsupported(self, what: str) -> BackendError:
        return BackendError(f"the {self.name or type(self).__name__} backend cannot compute {what}; use the "
                            "transformers backend for it")

    def generate(self, prompts: Sequence[str | Chat], cfg: GenerationConfig | None = None,
                 variant: str = "patched", desc: str = "generating", progress: bool = True) -> list[Generation]:
        raise self.unsupported("generations")

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], variant: str = "patched", batch_size: int = 16,
                      progress: bool = True, desc: str = "scoring") -> list[tuple[float, int]]:
        raise self.unsupported("log-likelihoods of continuations")

    def loglikelihood_rolling(self, texts: Sequence[str], variant: str = "patched", max_length: int = 512,
                              batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS,
                              progress: bool = True) -> list[tuple[float, int]]:
        raise self.unsupported("rolling log-likelihoods (perplexity)")

    def kl_to_base(self, prompts: Sequence[str | Chat], answers: Sequence[Sequence[int]], batch_size: int = 8,
                   max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True) -> dict[int, tuple[float, int]]:
        raise self.unsupported("KL(base || patched)")


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise BackendError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    return name


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available by its `name` (`get_backend(name)`)."""
    BACKENDS[cls.name] = cls
    return cls


@register_backend
class TransformersBackend(Backend):
    """A transformers model: `model` a loaded model (with `tok`; a PEFT model with its patch attached, or a
    FinetunedPair), or any --model spec to load. "base" switches a PEFT adapter off."""

    name = "transformers"

    def __init__(self, model: Any = "default", tok: Any = None, dtype: str | None = None,
                 device: str | None = None) -> None:
        if isinstance(model, str):
            from .loading import load_model

            model, loaded_tok = load_model(model, dtype=dtype, device=device)
            tok = tok or loaded_tok
        elif tok is None:
            raise BackendError("TransformersBackend: a loaded model needs its tokenizer (tok=)")
        self.model, self.tok = model, tok

    def generate(self, prompts: Sequence[str | Chat], cfg: GenerationConfig | None = None,
                 variant: str = "patched", desc: str = "generating", progress: bool = True) -> list[Generation]:
        with self.as_variant(variant) as m:
            return generate(m, self.tok, prompts, cfg, desc=desc, progress=progress)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], variant: str = "patched", batch_size: int = 16,
                      progress: bool = True, desc: str = "scoring") -> list[tuple[float, int]]:
        with self.as_variant(variant) as m:
            return score_continuations(m, self.tok, pairs, batch_size=batch_size, progress=progress, desc=desc)

    def loglikelihood_rolling(self, texts: Sequence[str], variant: str = "patched", max_length: int = 512,
                              batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS,
                              progress: bool = True) -> list[tuple[float, int]]:
        with self.as_variant(variant) as m:
            return rolling_loglikelihoods(m, self.tok, texts, max_length, batch_size, max_batch_tokens, progress)

    def kl_to_base(self, prompts: Sequence[str | Chat], answers: Sequence[Sequence[int]], batch_size: int = 8,
                   max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True) -> dict[int, tuple[float, int]]:
        chats = [as_chat(p) for p in prompts]
        return answer_kl(self.model, self.tok, chats, [list(a) for a in answers], batch_size, max_batch_tokens,
                         progress)

    def as_variant(self, name: str) -> Any:
        """`modeling.variant` of this backend's model: a context manager yielding the model."""
        return variant(self.model, check_variant(name))


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise BackendError(f"the vllm backend needs vLLM, which is not installed: {VLLM_INSTALL_HINT}; "
                           "or use the default transformers backend") from None
    return vllm


# vLLM accepts these values of max_lora_rank (vllm.config.LoRAConfig); a patch's rank is rounded up to one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a LoRA of rank `rank`."""
    for r in VLLM_LORA_RANKS:
        if rank <= r:
            return r
    raise BackendError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def adapter_rank(patch_dir: Path) -> int:
    """The largest LoRA rank in a PEFT adapter directory's adapter_config.json."""
    import json

    cfg = json.loads((patch_dir / "adapter_config.json").read_text())
    ranks = [int(cfg.get("r") or 8)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


@register_backend
class VLLMBackend(Backend):
    """vLLM engine over the base model; a patch is served as a LoRA (`enable_lora`, `LoRARequest`).

    `patch`: an adapter directory the caller has already checked (`patches.check_adapter_dir`). Prompts go in as
    the same chat-template token ids the transformers backend uses; sampling uses cfg.seed. Generation only: the
    log-likelihood methods raise BackendError.
    """

    name = "vllm"

    def __init__(self, model: str = "default", patch: str | Path | None = None, max_lora_rank: int | None = None,
                 dtype: str = "auto", seed: int = 0, **llm_kwargs: Any) -> None:
        _require_vllm()
        from vllm import LLM

        from .loading import model_directory

        self.patch = Path(patch) if patch is not None else None
        kwargs: dict[str, Any] = dict(model=model_directory(model), dtype=dtype, seed=seed, **llm_kwargs)
        if self.patch is not None:
            rank = max_lora_rank or vllm_lora_rank(adapter_rank(self.patch))
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        self.llm = LLM(**kwargs)
        self.tok = self.llm.get_tokenizer()

    def lora_request(self) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest("safetypatch", 1, str(self.patch)) if self.patch is not None else None

    def sampling_params(self, cfg: GenerationConfig) -> Any:
        from vllm import SamplingParams

        stop = sorted(i for i in {self.tok.eos_token_id} if i is not None)
        if cfg.do_sample:
            return SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed, stop_token_ids=stop)
        return SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stop)

    def generate(self, prompts: Sequence[str | Chat], cfg: GenerationConfig | None = None,
                 variant: str = "patched", desc: str = "generating", progress: bool = True) -> list[Generation]:
        cfg = cfg or GenerationConfig()
        patched = check_variant(variant) == "patched"
        inputs = [{"prompt_token_ids": prompt_ids(self.tok, as_chat(p))} for p in prompts]
        outs = self.llm.generate(inputs, self.sampling_params(cfg), use_tqdm=progress,
                                 lora_request=self.lora_request() if patched else None)
        stop = {self.tok.eos_token_id}
        results = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            while toks and toks[-1] in stop:
                toks.pop()
            results.append(Generation(text=c.text.strip(), token_ids=toks, finished=c.finish_reason == "stop"))
        return results


BACKEND_ALIASES = {"hf": "transformers", "huggingface": "transformers"}


def get_backend(name: str = "transformers", **kwargs: Any) -> Backend:
    """A generation backend by name ('transformers' / 'hf', 'vllm'); kwargs go to its constructor."""
    key = BACKEND_ALIASES.get(name.lower(), name.lower())
    if key not in BACKENDS:
        raise BackendError(f"unknown generation backend '{name}'; available: {sorted(BACKENDS)}")
    if key == "vllm":
        _require_vllm()  # before anything is loaded, so the message is the first thing a user sees
    return BACKENDS[key](**kwargs)
