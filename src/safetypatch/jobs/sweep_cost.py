"""Before a sweep trains anything: check every point against the model's structure, and estimate its cost.

The model is built from its config on the meta device (no weights are read), so `check_model_fit` (layers in range,
targets the layers really hold) runs for every point in a second, and its parameter counts give the cost model:

    train_s = tokens x params_run / TRAIN_RATE + dev_checks x dev_prompts x dev_tokens x params / DEV_RATE
              + setup: the A-initialisation's pass (prompt tokens x params / FORWARD_RATE) and the prefix cache
              (tokens of one epoch x params below the first patched layer / FORWARD_RATE)
    eval_s  = variants x prompts x max_new_tokens x params / GEN_RATE
    geometry_s = modules x GEOMETRY_S

tokens = epochs x (characters of every training example / CHARS_PER_TOKEN + TEMPLATE_TOKENS); params_run = the
parameters of the layers a step runs forward and backward (from the first patched layer up, with the frozen-prefix
cache; every layer without it or for full fine-tuning, x FULL_FACTOR for the optimizer over every weight) plus
the embedding matrix once (the LM head). The rates were fitted on this machine (2 CPU cores) to the points of the
quick rank sweep; `benchmarks/sweep_estimates.py` prints estimate against measurement for any finished sweep
(docs/results.md). A GPU runs far faster, so estimates there are upper bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import parse_layers
from ..training.config import TrainConfig

CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS = 40.0  # the chat template's system prompt and turn markers, per example
TRAIN_RATE = 6.0e10  # parameter-tokens per second through forward and backward (2 CPU cores, bf16 autocast)
FORWARD_RATE = 1.3e11  # parameter-tokens per second of a forward pass without generation (A-init, prefix cache)
GEN_RATE = 1.4e10  # parameter-tokens per second of a suite's entries (generation, judging, KL, multiple choice)
DEV_RATE = 8.6e10  # parameter-tokens per second of a dev check (short greedy answers, batch 64; the demo's 32 checks)
FULL_FACTOR = 1.6  # full fine-tuning: gradients and AdamW state for every weight on top of the passes
GEOMETRY_S = 0.5  # one SVD-based record per patched module (SVDs cached per model)
MODEL_LOAD_S = 4.0  # each of train, eval and geometry loads the model once (counted in each stage)


@dataclass
class Cost:
    train_s: float
    eval_s: float
    geometry_s: float

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s + self.geometry_s


def model_skeleton(spec: str, chat_template: str = "auto") -> Any:
    """The model's modules on the meta device (no weights read): enough for structure checks and counts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling.loading import model_directory

    config = AutoConfig.from_pretrained(model_directory(spec))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_points(points: list[Any], skeleton: Any) -> None:
    """`check_model_fit` for every point (ConfigError naming the point), before any point trains."""
    from ..errors import ConfigError
    from ..training.step import check_model_fit

    for p in points:
        try:
            check_model_fit(p.recipe, skeleton)
        except ConfigError as e:
            raise ConfigError(f"point {p.name}: {e}") from None


def data_sizes(cfg: TrainConfig) -> tuple[int, float, float]:
    """(examples, characters per example, prompt characters per example) of the training set, anchors counted at
    `anchor_tokens` answers."""
    from ..data.builtin import BUILTIN_ANCHORS, BUILTIN_REFUSALS, resolve_prompts

    refusals = resolve_prompts(BUILTIN_REFUSALS if cfg.data == "builtin" else cfg.data, cfg.prompt_field,
                               cfg.response_field, require_response=True)
    chars = [len(r.prompt) + len(r.response or "") for r in refusals]
    prompts = [len(r.prompt) for r in refusals]
    if cfg.benign and cfg.benign.lower() != "none":
        anchors = resolve_prompts(BUILTIN_ANCHORS if cfg.benign == "builtin" else cfg.benign, cfg.prompt_field, None)
        chars += [len(r.prompt) + cfg.anchor_tokens * CHARS_PER_TOKEN for r in anchors]
        prompts += [len(r.prompt) for r in anchors]
    n = len(chars)
    if cfg.mix and cfg.mix_ratio > 0:
        n_mix = round(cfg.mix_ratio / (1 - cfg.mix_ratio) * n)
        chars += [sum(chars) / max(n, 1)] * n_mix  # mixed examples: counted at the average length
    return len(chars), sum(chars) / max(len(chars), 1), sum(prompts) / max(len(prompts), 1)


def params_run(cfg: TrainConfig, skeleton: Any) -> tuple[float, float]:
    """(parameters a training step runs, the model's parameters)."""
    from ..modeling.architecture import decoder_layers

    blocks = decoder_layers(skeleton)
    per_layer = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in skeleton.parameters())
    head = skeleton.get_output_embeddings().weight.numel()
    layers = parse_layers(cfg.layers, len(blocks))
    start = min(layers) if cfg.method == "lora" and cfg.cache_frozen_prefix else 0
    run = sum(per_layer[start:]) + head
    return (run * FULL_FACTOR if cfg.method == "full" else run), float(total)


def train_cost(cfg: TrainConfig, skeleton: Any) -> float:
    n, chars, prompt_chars = data_sizes(cfg)
    run, total = params_run(cfg, skeleton)
    epoch_tokens = n * (chars / CHARS_PER_TOKEN + TEMPLATE_TOKENS)
    steps = math.ceil(cfg.epochs * math.ceil(n / cfg.batch_size) / cfg.grad_accum)
    every = cfg.eval_every or max(1, math.ceil(n / cfg.batch_size / cfg.grad_accum))
    checks = (steps // every + 2) if cfg.method == "lora" else 0
    loop = cfg.epochs * epoch_tokens * run / TRAIN_RATE + checks * 2 * cfg.dev_size * cfg.dev_tokens * total / DEV_RATE
    if cfg.method != "lora":
        return loop
    prompt_tokens = n * (prompt_chars / CHARS_PER_TOKEN + TEMPLATE_TOKENS)
    init = prompt_tokens * total / FORWARD_RATE if cfg.init != "default" else 0.0
    below = max(total - run, 0.0) if cfg.cache_frozen_prefix else 0.0  # the layers the prefix cache runs once
    return loop + init + epoch_tokens * below / FORWARD_RATE


def eval_cost(suite: Any, limit: int | None, max_new_tokens: int | None, skeleton: Any) -> float:
    """Both variants' answers to every entry (its limit, or `limit`, or 100 prompts), at the suite's length."""
    total = sum(p.numel() for p in skeleton.parameters())
    tokens = max_new_tokens or suite.generation.max_new_tokens
    prompts = 0
    for e in suite.entries:
        n = min(x for x in (e.limit, limit, 100) if x)
        prompts += n * max(1, len(getattr(e, "attacks", None) or [None]))
    return 2 * prompts * tokens * total / GEN_RATE


def geometry_cost(cfg: TrainConfig, skeleton: Any) -> float:
    from ..modeling.architecture import num_layers
    from ..modeling.roles import resolve_targets

    layers = parse_layers(cfg.layers, num_layers(skeleton))
    per_layer = 7 if cfg.method == "full" else len(resolve_targets(skeleton, cfg.target_modules).modules)
    return len(layers) * per_layer * GEOMETRY_S


def estimate(cfg: TrainConfig, skeleton: Any, suite: Any, ev: dict[str, Any], geometry: bool) -> Cost:
    return Cost(train_s=MODEL_LOAD_S + train_cost(cfg, skeleton),
                eval_s=MODEL_LOAD_S + eval_cost(suite, ev.get("limit"), ev.get("max_new_tokens"), skeleton),
                geometry_s=MODEL_LOAD_S + geometry_cost(cfg, skeleton) if geometry else 0.0)
