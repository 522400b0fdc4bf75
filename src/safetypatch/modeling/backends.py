"""Generation backends: one interface over transformers (default) and vLLM with LoRA (optional extra, GPU only)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

from ..config import GenerationConfig
from ..data.chat import prompt_ids
from ..errors import BackendError
from .generation import Chat, Generation, as_chat, generate

VLLM_INSTALL_HINT = "pip install 'safetypatch[vllm]' (Linux with a CUDA GPU)"




class Backend:
    """Generates answers for chat prompts, with the patch on (default) or off. Subclasses set `name`."""

    name: ClassVar[str] = ""

    def generate(self, prompts: Sequence[str | Chat], cfg: GenerationConfig | None = None, patched: bool = True,
                 desc: str = "generating", progress: bool = True) -> list[Generation]:
        raise NotImplementedError


class TransformersBackend(Backend):
    """`generate` on a transformers model. `model`: a loaded model (with `tok`), or any --model spec to load;
    `patch` attaches a patch directory to a model loaded here. `patched=False` switches a PEFT adapter off."""

    name = "transformers"

    def __init__(self, model: Any = "default", tok: Any = None, patch: str | Path | None = None,
                 dtype: str | None = None, device: str | None = None, verify_patch: bool = True) -> None:
        if isinstance(model, str):
            from .loading import load_model

            model, loaded_tok = load_model(model, dtype=dtype, device=device)
            tok = tok or loaded_tok
        elif tok is None:
            raise BackendError("TransformersBackend: a loaded model needs its tokenizer (tok=)")
        if patch is not None:
            from ..patches.artifact import load_patch

            model = load_patch(model, patch, verify=verify_patch)
        self.model, self.tok = model, tok

    @contextlib.contextmanager
    def _variant(self, patched: bool) -> Iterator[Any]:
        if not patched and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model

    def generate(self, prompts: Sequence[str | Chat], cfg: GenerationConfig | None = None, patched: bool = True,
                 desc: str = "generating", progress: bool = True) -> list[Generation]:
        with self._variant(patched) as m:
            return generate(m, self.tok, prompts, cfg, desc=desc, progress=progress)


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


def _adapter_rank(patch_dir: Path) -> int:
    import json

    cfg = json.loads((patch_dir / "adapter_config.json").read_text())
    ranks = [int(cfg.get("r") or 8)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


class VLLMBackend(Backend):
    """vLLM engine over the base model; a patch is served as a LoRA (`enable_lora`, `LoRARequest`).

    Prompts go in as the same chat-template token ids the transformers backend uses; sampling uses cfg.seed.
    """

    name = "vllm"

    def __init__(self, model: str = "default", patch: str | Path | None = None, max_lora_rank: int | None = None,
                 dtype: str = "auto", seed: int = 0, **llm_kwargs: Any) -> None:
        _require_vllm()
        from vllm import LLM

        from .loading import model_directory
        from ..patches.artifact import check_adapter_dir

        self.patch = check_adapter_dir(patch) if patch is not None else None
        kwargs: dict[str, Any] = dict(model=model_directory(model), dtype=dtype, seed=seed, **llm_kwargs)
        if self.patch is not None:
            rank = max_lora_rank or vllm_lora_rank(_adapter_rank(self.patch))
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

    def generate(self, prompts: Sequence[str | Chat], cfg: GenerationConfig | None = None, patched: bool = True,
                 desc: str = "generating", progress: bool = True) -> list[Generation]:
        cfg = cfg or GenerationConfig()
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


BACKENDS: dict[str, type[Backend]] = {"transformers": TransformersBackend, "vllm": VLLMBackend}
_BACKEND_ALIASES = {"hf": "transformers", "huggingface": "transformers"}


def get_backend(name: str = "transformers", **kwargs: Any) -> Backend:
    """A generation backend by name ('transformers' / 'hf', 'vllm'); kwargs go to its constructor."""
    key = _BACKEND_ALIASES.get(name.lower(), name.lower())
    if key not in BACKENDS:
        raise BackendError(f"unknown generation backend '{name}'; available: {sorted(BACKENDS)}")
    if key == "vllm":
        _require_vllm()  # before anything is loaded, so the message is the first thing a user sees
    return BACKENDS[key](**kwargs)
