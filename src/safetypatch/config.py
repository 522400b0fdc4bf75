"""Dataclass configs for every component, with YAML load/dump and validation that names the bad field.

The CLI builds its flags from these dataclasses (the TRL / HfArgumentParser habit): a YAML recipe maps 1:1 onto
the fields and flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .data.builtin import DEV_BENIGN, DEV_HARMFUL


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field and the file."""


def safetypatch_home() -> Path:
    """Root of safetypatch's caches (models converted from GGUF, base-model answers, SVDs)."""
    return Path(os.environ.get("SAFETYPATCH_HOME", Path.home() / ".cache" / "safetypatch")).expanduser()


@dataclass
class PatchShape:
    """Where the LoRA patch goes and how big it is."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is (alpha / r) B A"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["up_proj"], metadata={"help": "module names to patch, comma separated"}
    )
    layers: str = field(
        default="middle",
        metadata={"help": "layers: 'all', 'early' / 'middle' / 'late' third, a range '10-19' or a list '3,5,7'"},
    )

    def validate(self, where: str = "config") -> None:
        if self.rank < 1:
            raise ConfigError(f"{where}: field 'rank' must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}: field 'alpha' must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: field 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{where}: field 'target_modules' is empty")


@dataclass
class TrainConfig(PatchShape):
    """A refusal-SFT recipe: what to train, on what, how. Defaults are the demo's winning recipe."""

    model: str = field(default="default", metadata={"help": "hub id, local dir, .gguf file, or 'default'"})
    method: str = field(default="lora", metadata={"help": "'lora' (a patch) or 'full' (full fine-tuning baseline)"})
    data: str = field(
        default="builtin",
        metadata={"help": "refusal data: 'builtin' or a JSONL/CSV/Parquet file or hub dataset id with prompt+response"},
    )
    prompt_field: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    response_field: str = field(default="response", metadata={"help": "column holding the response"})
    benign: str | None = field(
        default="builtin",
        metadata={"help": "benign anchor prompts answered by the base model itself ('builtin', a file, or 'none')"},
    )
    benign_loss: str = field(default="ce", metadata={"help": "anchor objective: 'ce' (self-distillation) or 'kl'"})
    benign_weight: float = field(default=6.0, metadata={"help": "weight of the anchor loss"})
    decision_tokens: int = field(default=4, metadata={"help": "first N response tokens get extra weight "
                                                                  "(where refuse-or-answer is decided); 0: off"})
    decision_weight: float = field(default=4.0, metadata={"help": "loss weight of those first response tokens"})
    anchor_tokens: int = field(default=48, metadata={"help": "max tokens of the base model's answer used as anchor"})
    init: str = field(default="lda", metadata={"help": "LoRA A init: 'default' (PEFT's), 'contrast' "
                                                             "(harmful-minus-benign input direction) or 'lda' "
                                                             "(that direction whitened: Fisher's discriminant)"})
    freeze_a: bool = field(default=True, metadata={"help": "keep LoRA A fixed at its init (train B only)"})
    mix: str | None = field(default=None, metadata={"help": "general-purpose prompt/response file mixed into training"})
    mix_ratio: float = field(default=0.0, metadata={"help": "fraction of mixed examples in the training set"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "'cosine', 'linear' or 'constant' (with warmup)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training set (fractions allowed)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(default=256, metadata={"help": "truncate examples to this many tokens"})
    seed: int = field(default=0, metadata={"help": "seed for splits, shuffling and initialisation"})
    eval_every: int = field(default=10, metadata={"help": "steps between dev checks for early stopping (0: per epoch)"})
    patience: int = field(default=0, metadata={"help": "dev checks without improvement before stopping (0: never)"})
    dev_harmful: str = field(default=DEV_HARMFUL, metadata={"help": "harmful prompts for early stopping"})
    dev_benign: str = field(default=DEV_BENIGN, metadata={"help": "benign prompts for early stopping"})
    dev_size: int = field(default=100, metadata={"help": "dev prompts per side used for early stopping"})
    dev_tokens: int = field(default=24, metadata={"help": "tokens generated per dev prompt for early stopping"})
    overlap_beta: float = field(default=0.0, metadata={"help": "weight of the overlap regularizer "
                                                         "(penalty on dW inside W0's top-k subspace); 0: off"})
    overlap_k: int = field(default=16, metadata={"help": "top-k singular subspace the overlap regularizer protects"})
    overlap_side: str = field(default="both", metadata={"help": "overlap regularizer side: column, row or both"})
    overlap_variant: str = field(default="normalized", metadata={"help": "overlap regularizer weighting: "
                                                                 "'uniform' (no S_k) or 'normalized' (S_k / s_1)"})
    dev_penalty: float = field(default=10.0, metadata={"help": "early-stopping score: harmful refusal minus this "
                                                       "times the benign over-refusal beyond the tolerance"})
    dev_tolerance: float = field(default=0.0, metadata={"help": "benign refusal above the base model's that the "
                                                         "early-stopping score forgives"})
    bf16: str = field(default="auto", metadata={"help": "bf16 autocast: 'auto' (when the CPU/GPU supports it), 'yes', 'no'"})
    response_only_logits: bool = field(default=True, metadata={"help": "apply lm_head to response tokens only"})
    group_by_length: bool = field(default=True, metadata={"help": "batch examples of similar length together"})
    # speed paths (docs/performance.md); none of them changes the objective
    cache_frozen_prefix: bool = field(default=True, metadata={
        "help": "compute the frozen layers below the first patched layer once per example and reuse their output "
                "every epoch (training runs from the first patched layer up)"})
    prefix_cache_dtype: str = field(default="float32", metadata={
        "help": "dtype of the cached hidden states: 'float32' (exact) or 'bfloat16' (half the memory)"})
    prefix_cache_max_mb: float = field(default=2048.0, metadata={
        "help": "largest prefix cache kept in memory (MB); a bigger one is skipped and the layers recomputed"})
    bf16_frozen_weights: bool = field(default=True, metadata={
        "help": "under bf16 autocast, hold frozen linear weights in bf16 while training (autocast would re-cast "
                "them on every call; the matmuls are the same); fp32 weights are restored afterwards"})
    train_attention: str = field(default="auto", metadata={
        "help": "attention kernel while training: 'auto' (eager on CPU under bf16 autocast, faster than SDPA's "
                "flash kernel on short sequences; else unchanged), 'eager', 'sdpa' or 'keep'"})
    share_prompt_prefix: bool = field(default=True, metadata={
        "help": "with the frozen-prefix cache: run the prompt prefix every example shares (the chat template's "
                "system prompt and user header) through the trained layers once per batch, and let every row "
                "attend to its cached keys and values"})
    tune_malloc: bool = field(default=True, metadata={
        "help": "on CPU (Linux, glibc): keep freed memory in the process for reuse instead of returning it to the "
                "OS after every step (mallopt; process-wide), so activations are not page-faulted in again"})
    save_dtype: str = field(default="float16", metadata={"help": "dtype of the saved adapter weights"})

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        choices = {
            "method": ("lora", "full"),
            "benign_loss": ("ce", "kl"),
            "schedule": ("cosine", "linear", "constant"),
            "bf16": ("auto", "yes", "no"),
            "save_dtype": ("float32", "float16", "bfloat16"),
            "overlap_side": ("column", "row", "both"),
            "overlap_variant": ("uniform", "normalized"),
            "init": ("default", "contrast", "lda"),
            "prefix_cache_dtype": ("float32", "bfloat16"),
            "train_attention": ("auto", "eager", "sdpa", "keep"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}: field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lr", "epochs", "batch_size", "grad_accum", "max_length", "anchor_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: field '{name}' must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.mix_ratio < 1.0:
            raise ConfigError(f"{where}: field 'mix_ratio' must be in [0, 1), got {self.mix_ratio}")
        if self.overlap_beta < 0 or self.overlap_k < 1:
            raise ConfigError(f"{where}: fields 'overlap_beta' must be >= 0 and 'overlap_k' >= 1")
        if self.overlap_beta > 0 and self.method != "lora":
            raise ConfigError(f"{where}: the overlap regularizer ('overlap_beta') applies to method 'lora' only")
        if self.mix_ratio > 0 and not self.mix:
            raise ConfigError(f"{where}: field 'mix_ratio' is {self.mix_ratio} but no 'mix' file is given")

    def shape(self) -> PatchShape:
        return PatchShape(**{f.name: getattr(self, f.name) for f in fields(PatchShape)})


@dataclass
class GenerationConfig:
    """Batched generation settings shared by evaluation, anchors and early stopping."""

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # bf16 autocast while generating: ~1.8x faster on a CPU with native bf16 (AVX512-BF16 / AMX); greedy tokens
    # then differ from fp32 after the first near-tie, the refusal verdicts did not (docs/performance.md)
    bf16: bool = False


C = TypeVar("C")


def _coerce(value: Any, ftype: Any, name: str, where: str) -> Any:
    """Convert a YAML / CLI value to the field's declared type, or raise a ConfigError naming the field."""
    t = str(ftype)
    try:
        if value is None:
            return None
        if "list[str]" in t:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if t.startswith("bool") or t == "<class 'bool'>":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t.startswith("int") or t == "<class 'int'>":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float") or t == "<class 'float'>":
            return float(value)
        if "str" in t:
            if isinstance(value, str) and value.lower() in ("none", "null", "") and "None" in t:
                return None
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: field '{name}' expects {t.replace('<class ', '').rstrip('>')}, got {value!r}") from None
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build a dataclass from a mapping, refusing unknown keys and coercing types; names the bad field."""
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        hint = ""
        for u in unknown:
            close = [k for k in known if k.replace("_", "") == u.replace("_", "").replace("-", "")]
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        raise ConfigError(f"{where}: unknown field(s) {unknown}{hint}; known fields: {sorted(known)}")
    kwargs = {k: _coerce(v, known[k].type, k, where) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)  # type: ignore[attr-defined]
    return obj


def load_yaml(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
    """Load a YAML recipe into `cls`; `overrides` (e.g. CLI flags) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    data.update(overrides or {})
    return from_dict(cls, data, where=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Turn a layer selection into sorted layer indices.

    Accepts 'all', 'early' / 'middle' / 'late' (thirds of the model's layers; the remainder goes to the middle),
    an inclusive range '10-19', a comma list '3,5,7', or a list of ints.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        out = sorted({int(x) for x in spec})
    else:
        s = spec.strip().lower()
        third = num_layers // 3
        if s in ("early", "middle", "late"):
            bounds = {"early": (0, third), "middle": (third, num_layers - third), "late": (num_layers - third, num_layers)}
            lo, hi = bounds[s]
            out = list(range(lo, hi))
        elif m := _RANGE.match(s):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ConfigError(f"layers: range '{spec}' goes backwards")
            out = list(range(lo, hi + 1))
        else:
            try:
                out = sorted({int(x) for x in s.split(",") if x.strip()})
            except ValueError:
                raise ConfigError(
                    f"layers: cannot read '{spec}'; use 'all', 'early', 'middle', 'late', '10-19' or '3,5,7'"
                ) from None
    if not out:
        raise ConfigError(f"layers: '{spec}' selects no layer of a {num_layers}-layer model")
    bad = [i for i in out if i < 0 or i >= num_layers]
    if bad:
        raise ConfigError(f"layers: {bad} out of range for a model with {num_layers} layers (0..{num_layers - 1})")
    return out
