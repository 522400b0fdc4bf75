"""TrainConfig: a refusal-SFT recipe (what to train, on what, how), with its validation.

Flags of `safetypatch train` / `demo` are generated from its fields (their `help` is the flag help); a YAML recipe
maps 1:1 onto them and flags given on the command line override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..config import MODEL_HELP, PatchShape, SEED_MAX
from ..data.builtin import DEV_BENIGN, DEV_HARMFUL
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice
from ..errors import ConfigError


@dataclass
class TrainConfig(PatchShape):
    """A refusal-SFT recipe: what to train, on what, how. Defaults are the demo's winning recipe."""

    model: str = field(default="default", metadata={"help": MODEL_HELP})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)
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
    benign_weight: float = field(default=6.0, metadata={"min": 0, "help": "weight of the anchor loss"})
    decision_tokens: int = field(default=4, metadata={"min": 0, "help": "first N response tokens get extra weight "
                                                             "(where refuse-or-answer is decided); 0: off"})
    decision_weight: float = field(default=4.0, metadata={
        "min": 0, "help": "loss weight of those first response tokens"})
    anchor_tokens: int = field(default=48, metadata={
        "min": 1, "help": "max tokens of the base model's answer used as anchor"})
    recovery: float = field(default=1.0, metadata={
        "min": 0, "help": "safety-recovery examples per refusal example (Qi et al. 2025): the harmful prompt, the first "
                          "k tokens of a compliant answer, then the refusal (loss on the refusal only); 0: off"})
    recovery_source: str = field(default="base", metadata={
        "help": "compliant answers the recovery examples start from: 'base' (the base model's own greedy answers, "
                "cached) or a JSONL/CSV/Parquet file with prompt + response"})
    recovery_min_prefix: int = field(default=1, metadata={
        "min": 1, "help": "fewest compliant-answer tokens before a recovery example's refusal"})
    recovery_max_prefix: int = field(default=40, metadata={
        "min": 1, "help": "most compliant-answer tokens before a recovery example's refusal (k is drawn uniformly)"})
    init: str = field(default="lda", metadata={"help": "LoRA A init: 'default' (PEFT's), 'contrast' "
                                                             "(harmful-minus-benign input direction) or 'lda' "
                                                             "(that direction whitened: Fisher's discriminant)"})
    freeze_a: bool = field(default=True, metadata={"help": "keep LoRA A fixed at its init (train B only)"})
    mix: str | None = field(default=None, metadata={"help": "general-purpose prompt/response file mixed into training"})
    mix_prompt_field: str | None = field(default=None, metadata={
        "help": "column holding the mixed data's prompt (default: --prompt-field)"})
    mix_response_field: str | None = field(default=None, metadata={
        "help": "column holding the mixed data's response (default: --response-field)"})
    mix_ratio: float = field(default=0.0, metadata={
        "min": 0, "lt": 1, "help": "fraction of mixed examples in the training set"})
    lr: float = field(default=2e-3, metadata={"gt": 0, "help": "peak learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "'cosine', 'linear' or 'constant' (with warmup)"})
    warmup_ratio: float = field(default=0.05, metadata={
        "min": 0, "max": 1, "help": "fraction of steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "help": "AdamW weight decay"})
    epochs: float = field(default=3.0, metadata={"gt": 0, "help": "passes over the training set (fractions allowed)"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "micro-batches per optimizer step"})
    max_length: int = field(default=256, metadata={"min": 1, "help": "truncate examples to this many tokens"})
    seed: int = field(default=0, metadata={
        "min": 0, "max": SEED_MAX, "help": "seed for splits, shuffling and initialisation"})
    eval_every: int = field(default=20, metadata={
        "min": 0, "help": "steps between dev checks for early stopping (0: per epoch)"})
    patience: int = field(default=0, metadata={
        "min": 0, "help": "dev checks without improvement before stopping (0: never)"})
    dev_harmful: str = field(default=DEV_HARMFUL, metadata={"help": "harmful prompts for early stopping"})
    dev_benign: str = field(default=DEV_BENIGN, metadata={"help": "benign prompts for early stopping"})
    dev_size: int = field(default=100, metadata={"min": 1, "help": "dev prompts per side used for early stopping"})
    dev_tokens: int = field(default=24, metadata={
        "min": 1, "help": "tokens generated per dev prompt for early stopping"})
    overlap_beta: float = field(default=0.0, metadata={"min": 0, "help": "weight of the overlap regularizer "
                                                                  "(penalty on dW inside W0's top-k subspace); 0: off"})
    overlap_k: int = field(default=16, metadata={
        "min": 1, "help": "top-k singular subspace the overlap regularizer protects"})
    overlap_side: str = field(default="both", metadata={"help": "overlap regularizer side: column, row or both"})
    overlap_variant: str = field(default="normalized", metadata={"help": "overlap regularizer weighting: "
                                                                 "'uniform' (no S_k) or 'normalized' (S_k / s_1)"})
    dev_penalty: float = field(default=10.0, metadata={
        "min": 0, "help": "early-stopping score: harmful refusal minus this times the benign over-refusal beyond "
                          "the tolerance"})
    dev_tolerance: float = field(default=0.0, metadata={
        "min": 0, "max": 1, "help": "benign refusal above the base model's that the early-stopping score forgives"})
    bf16: str = field(default="auto", metadata={"help": "bf16 autocast: 'auto' (when the CPU/GPU supports it), 'yes', 'no'"})
    response_only_logits: bool = field(default=True, metadata={"help": "apply lm_head to response tokens only"})
    group_by_length: bool = field(default=True, metadata={"help": "batch examples of similar length together"})
    # speed paths (docs/performance.md); none of them changes the objective
    cache_frozen_prefix: bool = field(default=True, metadata={
        "help": "compute the frozen layers below the first patched layer once per example and reuse their output "
                "every epoch (training runs from the first patched layer up)"})
    prefix_cache_dtype: str = field(default="float32", metadata={
        "help": "dtype of the cached hidden states: 'float32' (exact) or 'bfloat16' (half the memory)"})
    prefix_cache_max_mb: float = field(default=2048.0, metadata={"min": 0,
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
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype the base model's weights are loaded in for training: 'float32', 'bfloat16' or 'float16' "
                "(half the memory; the LoRA weights stay float32)"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base model's linear weights in 4-bit NF4 with bitsandbytes (CUDA GPUs only); the "
                "patch still applies to the unquantized base"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer's activations in the backward pass instead of keeping them "
                "(less memory for long sequences and large models, about a third more compute)"})

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
            "model_dtype": ("float32", "bfloat16", "float16"),
            "train_attention": ("auto", "eager", "sdpa", "keep"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}: field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        if self.overlap_beta > 0 and self.method != "lora":
            raise ConfigError(f"{where}: the overlap regularizer ('overlap_beta') applies to method 'lora' only")
        if self.method == "lora" and self.init in ("contrast", "lda") and (self.benign or "none").lower() == "none":
            raise ConfigError(f"{where}: init '{self.init}' needs benign prompts (field 'benign' is "
                              f"{self.benign!r}): set 'benign', or use init 'default'")
        if self.recovery_min_prefix > self.recovery_max_prefix:
            raise ConfigError(f"{where}: field 'recovery_min_prefix' ({self.recovery_min_prefix}) is above "
                              f"'recovery_max_prefix' ({self.recovery_max_prefix}): lower it or raise the maximum")
        if self.mix_ratio > 0 and not self.mix:
            raise ConfigError(f"{where}: field 'mix_ratio' is {self.mix_ratio} but no 'mix' file is given")
        if self.load_in_4bit and self.method != "lora":
            raise ConfigError(f"{where}: 'load_in_4bit' (QLoRA) trains a LoRA patch; 4-bit weights cannot be "
                              "fully fine-tuned: use method 'lora'")
        check_choice(self.chat_template, where=where)

    def shape(self) -> PatchShape:
        return PatchShape(**{f.name: getattr(self, f.name) for f in fields(PatchShape)})


def use_bf16(setting: str, device: str) -> bool:
    """Whether to train / generate under bf16 autocast: `setting` 'yes' / 'no', or 'auto' = where `device` runs
    bf16 natively (CUDA with bf16; CPUs with AVX512-BF16 / AMX, where autocast matmuls run ~2x faster)."""
    if setting == "yes":
        return True
    if setting == "no":
        return False
    from ..modeling import bf16_supported

    return bf16_supported(device)


def bf16_autocast(device: str, enabled: bool) -> Any:
    """torch's bf16 autocast context for `device` ('cuda:1' -> 'cuda'), a no-op when not `enabled`."""
    import torch

    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)
