"""`safetypatch train`: refusal-SFT into a LoRA patch (or the full fine-tuning / data-mixing baselines), as one job:
setup, loop, save.

Objective (training/loss.py): cross-entropy on refusal responses to harmful prompts, plus a benign-anchor term that
keeps the base model's own answers to benign prompts (self-distillation CE, or KL(base || patched) on the same
tokens), plus optional mixed general data. Early stopping picks the dev check that refuses most harmful dev prompts
without refusing benign dev prompts more often than the base model (training/dev_checks.py).

The loop is written by hand rather than with transformers.Trainer / TRL because its speed paths (logits on
response tokens only, length-grouped batches, bf16 autocast on CPU, the frozen-prefix cache; training/speed.py)
and the generation-based early stopping are not available there; checkpoints make it resumable.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config import to_dict
from ..data.chat import Encoded
from ..data.readers import Record
from ..data.templates import template_record
from ..errors import ConfigError, OutputExistsError
from ..io_utils import atomic_write_json, claim_output_dir, staged_dir
from ..modeling import fingerprint, load_model
from ..training.checkpoint import (check_resume_recipe, has_checkpoint, last_logged_loss, load_checkpoint,
                                   load_trainable, save_checkpoint, trainable_state, trained_parameters,
                                   trim_logs)
from ..training.config import TrainConfig, bf16_autocast, use_bf16
from ..training.dev_checks import dev_prompts, dev_score, refusal_rates
from ..training.distributed import (Ranks, check_batch, check_engine, current_ranks, gathered_state, prepare_sharded,
                                    shard)
from ..training.examples import batches, build_examples
from ..training.lora_init import init_patch
from ..training.regularizer import OverlapPenalty, overlap_penalty
from ..training.speed import SpeedPaths
from ..training.step import check_model_fit, prepare_model, train_step

MARKER = "train_config.json"  # the file that makes a directory a run's (written when the run directory is claimed)


@dataclass
class TrainResult:
    run_dir: Path
    output_dir: Path  # the patch directory (LoRA) or the fine-tuned model directory (full)
    stats: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model (a PeftModel for LoRA), ready for evaluation
    rank: int = 0  # this process's rank in a multi-process run (only rank 0 wrote the run's files)


@dataclass
class Job:
    """What the loop trains with, built once by `setup`."""
    cfg: TrainConfig
    run: Path
    device: str
    model: Any
    tok: Any
    examples: list[Encoded]
    data_meta: dict[str, Any]
    params: list[Any]
    optimizer: Any
    scheduler: Any
    overlap: OverlapPenalty | None
    steps_per_epoch: int
    total_steps: int
    use_bf16: bool
    dev: tuple[list[Record], list[Record]]
    ranks: Ranks = field(default_factory=Ranks)
    base_fingerprint: dict[str, Any] | None = None  # taken before a sharded engine splits the weights
    n_trainable: int = 0  # trainable parameters, counted before a sharded engine splits them

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id


@dataclass
class Progress:
    """The loop's state: what a checkpoint saves and a resume restores (plus the last step's loss)."""
    step: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the best dev check so far, with the trained tensors under "state"
    base_benign: float | None = None  # the base model's benign dev refusal: the reference for over-refusal
    last_loss: float | None = None

    def checkpoint(self, seed: int) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "history": self.history, "base_benign": self.base_benign,
                "seed": seed}


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True, model_and_tok: tuple[Any, Any] | None = None,
          base_model_meta: dict[str, Any] | None = None) -> TrainResult:
    """Train a patch (or a fully fine-tuned model) into `run_dir`; see the module docstring for the objective.

    `base_model_meta` (spec, fingerprint, ...) replaces what patch.json records as the base model, for a patch
    trained on top of others merged into the weights (red-teaming rounds): it still applies to the true base."""
    import torch

    cfg.validate()
    ranks = current_ranks()  # one process, or this rank of an `accelerate launch` (training/distributed.py)
    check_batch(cfg.batch_size, ranks)
    check_engine(cfg, ranks, resume)
    run = check_run_dir(cfg, run_dir, resume)  # nothing is written until the recipe fits the model and its data
    ranks.barrier()  # every rank has checked the run directory before rank 0 claims it
    device = device or ranks.device() or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = progress and ranks.main
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    t0 = time.time()
    job = setup(cfg, run, device, resume, model_and_tok, progress, ranks)
    state = restore(job, resume)
    speed, train_seconds = loop(job, state, progress)
    if state.best is not None:
        load_trainable(job.model, state.best["state"])
    stats = training_stats(job, state, speed, train_seconds, time.time() - t0)
    out = save(job, stats, base_model_meta)
    return TrainResult(run_dir=run, output_dir=out, stats=stats, history=state.history, model=job.model,
                       rank=ranks.rank)


# ------------------------------------------------------------------------------------------------- setup
def check_run_dir(cfg: TrainConfig, run_dir: str | Path, resume: bool) -> Path:
    """Refuse, before anything is loaded or written, a run directory that cannot take this run: a file, a finished
    run, results of another run without `resume`, or (with `resume`) a run of a different recipe."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise OutputExistsError(f"{run} is a file; --out takes a run directory (choose another --out)")
    out = output_dir(cfg, run)
    if out.exists():
        raise OutputExistsError(f"{out} already exists: this run finished; choose a new --out")
    if (run / MARKER).exists():
        if not resume:
            raise OutputExistsError(f"{run} already holds results; choose another --out, or pass --resume to "
                                    "continue that run")
        check_resume_recipe(run, cfg)
    return run


def output_dir(cfg: TrainConfig, run: Path) -> Path:
    """Where the run's result goes: RUN/patch (LoRA) or RUN/model (full fine-tuning)."""
    return run / ("patch" if cfg.method == "lora" else "model")


def claim_run(cfg: TrainConfig, run: Path, resume: bool, ranks: Ranks) -> None:
    """Claim the run directory (new, or an unfinished one with `resume`) and record the recipe in it (rank 0)."""
    if ranks.main:
        check_run_dir(cfg, run, resume)
        claim_output_dir(run, resume=resume, marker=MARKER)
        atomic_write_json(run / MARKER, to_dict(cfg))
    ranks.barrier()


def setup(cfg: TrainConfig, run: Path, device: str, resume: bool, model_and_tok: tuple[Any, Any] | None,
          progress: bool = True, ranks: Ranks | None = None) -> Job:
    """Model, data, trainable parameters (with their initialisation), optimizer, schedule and dev prompts; the run
    directory is claimed once the recipe fits the model (layers, target modules) and every data file was read."""
    import torch
    from transformers import get_scheduler

    ranks = ranks or Ranks()
    with ranks.whole_weights():  # what runs before the engine shards the model needs all of it
        model, tok = model_and_tok or load_model(cfg.model, dtype=cfg.model_dtype, chat_template=cfg.chat_template,
                                                 load_in_4bit=cfg.load_in_4bit)
        check_model_fit(cfg, model)
        model.to(device)
        with ranks.main_first():  # rank 0 answers the anchors into the cache; the others read them from it
            examples, data_meta, sources = build_examples(cfg, model, tok, progress=progress)
        dev = dev_prompts(cfg.dev_harmful, cfg.dev_benign, cfg.dev_size, cfg.prompt_field)
        if cfg.method == "lora" and cfg.init in ("contrast", "lda") and not sources["anchor"]:
            raise ConfigError(f"init '{cfg.init}' needs benign prompts: set --benign (or --init default)")
        claim_run(cfg, run, resume, ranks)
        model = prepare_model(cfg, model)
        init_patch(cfg, model, tok, sources, data_meta, fresh=not has_checkpoint(run), progress=progress)
    ranks.sync_parameters(list(trained_parameters(model).values()))
    overlap = overlap_penalty(cfg, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_fp = None
    if ranks.sharded:
        base_fp = fingerprint(model)
        model, optimizer = prepare_sharded(model, optimizer, ranks, cfg.batch_size // ranks.world)
        params = list(model.parameters())  # what the engine clips over (it knows which are trainable)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
    return Job(cfg=cfg, run=run, device=device, model=model, tok=tok, examples=examples, data_meta=data_meta,
               params=params, optimizer=optimizer, scheduler=scheduler, overlap=overlap,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, use_bf16=use_bf16(cfg.bf16, device),
               dev=dev, ranks=ranks, base_fingerprint=base_fp, n_trainable=n_trainable)


def restore(job: Job, resume: bool) -> Progress:
    """A fresh loop state, or, resuming a checkpointed run, its weights, optimizer, schedule, RNG and state."""
    state = Progress()
    if resume and has_checkpoint(job.run):
        meta, state.best = load_checkpoint(job.run, job.model, job.optimizer, job.scheduler)
        state.step, state.tokens, state.history = meta["step"], meta["tokens"], meta["history"]
        state.base_benign = meta["base_benign"]
        state.last_loss = last_logged_loss(job.run, state.step)  # a run checkpointed at its end runs no step
    if job.ranks.main:
        trim_logs(job.run, state.step)  # lines past the checkpoint (or of a start that never checkpointed) go
    job.ranks.barrier()
    return state


# ------------------------------------------------------------------------------------------------- loop
def loop(job: Job, state: Progress, progress: bool) -> tuple[SpeedPaths, float]:
    """Train to the end (or an early stop) under the speed paths; returns them (for their description) and the
    training seconds, which include their set-up (the prefix cache)."""
    from tqdm.auto import tqdm

    t_train = time.time()
    aside = f"the model is wrapped by {job.ranks.engine}" if job.ranks.sharded else None
    speed = SpeedPaths(job.model, job.cfg, job.examples, job.device, job.use_bf16, job.pad_id, progress=progress,
                       stepped_aside=aside)
    bar = tqdm(total=job.total_steps, initial=state.step, desc=f"train ({job.cfg.method})", disable=not progress)
    log_path = job.run / "train_log.jsonl" if job.ranks.main else os.devnull  # rank 0 writes the logs
    with open(log_path, "a", encoding="utf-8") as log_f, bar, speed:
        Loop(job, state, speed, bar, log_f, t_train).run()  # leaving `speed`: fp32 weights, the model's kernel back
    return speed, time.time() - t_train


class Loop:
    """Optimizer steps over shuffled epochs, with a dev check (logged, checkpointed, early stopping) every
    `eval_every` steps and at the end; a resumed run continues at the batch where its checkpoint was taken."""

    def __init__(self, job: Job, state: Progress, speed: SpeedPaths, bar: Any, log_f: IO[str], t_train: float):
        self.job, self.state, self.speed, self.bar, self.log_f, self.t_train = job, state, speed, bar, log_f, t_train
        self.eval_every = job.cfg.eval_every or job.steps_per_epoch
        # dev checks generate, which a rank holding a shard of the weights cannot do alone (check_engine says so)
        self.dev_checks = job.cfg.method == "lora" and not job.ranks.sharded

    def run(self) -> None:
        job, cfg, state = self.job, self.job.cfg, self.state
        if state.step == 0 and self.dev_checks:
            self.dev_check()  # the base model's dev refusal rates: the reference for over-refusal
        epoch = state.step // job.steps_per_epoch
        skip = (state.step % job.steps_per_epoch) * cfg.grad_accum
        stop = False
        while state.step < job.total_steps and not stop:
            order = batches(job.examples, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)[skip:]
            skip = 0
            stop = self.epoch(order)
            epoch += 1

    def epoch(self, order: list[list[int]]) -> bool:
        """Steps over one epoch's batches; True when early stopping ends training."""
        cfg, state, total = self.job.cfg, self.state, self.job.total_steps
        for k in range(0, len(order), cfg.grad_accum):
            self.optimizer_step(order[k: k + cfg.grad_accum])
            stop = False
            if (state.step % self.eval_every == 0 or state.step == total) and self.dev_checks:
                stop = self.dev_check()
            if stop or state.step >= total:
                return stop
        return False

    def optimizer_step(self, group: list[list[int]]) -> None:
        """One optimizer step over a group of micro-batches, logged to train_log.jsonl."""
        job, state, ranks = self.job, self.state, self.job.ranks
        mine = [shard(idx, ranks.rank, ranks.world) for idx in group]  # this rank's slice of each micro-batch
        loss, parts, n_tok = train_step(job.model, (self.micro_batch(m, idx) for m, idx in zip(mine, group)),
                                        job.cfg, job.optimizer, job.scheduler, job.params, device=job.device,
                                        use_bf16=job.use_bf16, overlap=job.overlap, ranks=ranks)
        state.tokens += n_tok
        state.step += 1
        rec = {"step": state.step, "loss": round(loss, 5), **{k: round(v, 5) for k, v in parts.items()},
               "lr": job.scheduler.get_last_lr()[0], "tokens": state.tokens,
               "elapsed_s": round(time.time() - self.t_train, 2)}
        state.last_loss = rec["loss"]
        self.log_f.write(json.dumps(rec) + "\n")
        self.log_f.flush()
        self.bar.update(1)
        self.bar.set_description(f"train ({job.cfg.method}) loss {loss:.3f}")

    def micro_batch(self, mine: list[int], whole: list[int]) -> dict[str, Any] | None:
        """This rank's part of a micro-batch; for an empty part None, or under a sharded engine (whose every rank
        must run each forward and backward) the batch's first example with its loss weighted 0 (`skip_loss`)."""
        if mine:
            return self.speed.collate(mine)
        if not self.job.ranks.sharded:
            return None
        return {**self.speed.collate(whole[:1]), "skip_loss": True}

    def dev_check(self) -> bool:
        """Dev refusal rates now: logged to dev_log.jsonl, kept as the best when the score improves, checkpointed.
        True when training should stop (patience exhausted)."""
        job, cfg, state, model = self.job, self.job.cfg, self.state, self.job.model
        rates = job.ranks.broadcast(self.dev_rates() if job.ranks.main else None)  # once, on rank 0
        if state.base_benign is None:
            state.base_benign = rates["benign_refusal"]
        rec = {"step": state.step, **rates,
               "score": dev_score(rates, state.base_benign, cfg.dev_penalty, cfg.dev_tolerance)}
        state.history.append(rec)
        if state.step > 0 and (state.best is None or rec["score"] > state.best["score"]):
            state.best = {**rec, "state": trainable_state(model)}
        if job.ranks.main:
            with open(job.run / "dev_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            save_checkpoint(job.run, model, job.optimizer, job.scheduler, state.checkpoint(cfg.seed), state.best)
        self.bar.set_postfix_str(f"dev harm {rates['harmful_refusal']:.0%} benign {rates['benign_refusal']:.0%}")
        if cfg.patience and state.best is not None:
            since = [h for h in state.history if h["step"] > state.best["step"]]
            return len(since) >= cfg.patience
        return False

    def dev_rates(self) -> dict[str, float]:
        """Refusal rates of the model as it is now on the dev prompts (greedy, `dev_tokens` tokens)."""
        job, model = self.job, self.job.model
        model.eval()
        with bf16_autocast(job.device, job.use_bf16), self.speed.for_generation():
            # batch 64 on CPU too: ~1.6x faster than 16 with the shared-prefix decoding (docs/performance.md)
            rates = refusal_rates(model, job.tok, *job.dev, job.cfg.dev_tokens, batch_size=64,
                                  progress=not self.bar.disable, desc=f"dev check (step {self.state.step})")
        model.train()
        return rates


# ------------------------------------------------------------------------------------------------- save
def training_stats(job: Job, state: Progress, speed: SpeedPaths, train_seconds: float, total_seconds: float
                   ) -> dict[str, Any]:
    """train_stats.json (also patch.json's `training`)."""
    best = state.best
    return {
        "steps": state.step, "examples": len(job.examples), "tokens": state.tokens,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(state.tokens / max(train_seconds, 1e-9), 1),
        "total_seconds": round(total_seconds, 1), "final_loss": state.last_loss if state.step else None,
        "trainable_parameters": job.n_trainable, "bf16_autocast": job.use_bf16,
        "device": job.device, "speed_paths": speed.describe(),
        "best_dev": {k: v for k, v in best.items() if k != "state"} if best else None,
        "base_dev": state.history[0] if state.history else None,
    }


def save(job: Job, stats: dict[str, Any], base_model_meta: dict[str, Any] | None) -> Path:
    """The patch (LoRA) or the fine-tuned model (full), then train_stats.json, written by rank 0 (a sharded
    engine gathers the weights first, on every rank); returns the output directory."""
    job.model.eval()
    ranks = job.ranks
    model, state_dict = gathered_state(job.model, ranks)
    if ranks.main:
        if job.cfg.method == "lora":
            save_lora(job, model, state_dict, stats, base_model_meta)
        else:
            save_full(job, model, state_dict, stats)
        atomic_write_json(job.run / "train_stats.json", stats)
    ranks.barrier()  # no rank returns before the patch is in place
    return output_dir(job.cfg, job.run)


def save_lora(job: Job, model: Any, state_dict: dict[str, Any] | None, stats: dict[str, Any],
              base_model_meta: dict[str, Any] | None) -> None:
    """The patch from `model` (or from `state_dict`, gathered from sharded ranks)."""
    from ..patches import save_patch, shape_record

    cfg = job.cfg
    base = base_model_meta or {"spec": cfg.model}
    if job.base_fingerprint is not None:
        base = {"fingerprint": job.base_fingerprint, **base}
    meta = {"base_model": base, "recipe": to_dict(cfg), "shape": shape_record(cfg.shape(), model),
            "data": job.data_meta, "training": stats, "chat_template": template_record(job.tok)}
    save_patch(model, output_dir(cfg, job.run), meta, save_dtype=cfg.save_dtype, state_dict=state_dict)


def save_full(job: Job, model: Any, state_dict: dict[str, Any] | None, stats: dict[str, Any]) -> None:
    """The fully fine-tuned model from `model` (or from `state_dict`, gathered from sharded ranks)."""
    with staged_dir(output_dir(job.cfg, job.run)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        job.tok.save_pretrained(tmp)
        atomic_write_json(tmp / "finetune.json", {"base_model": {"spec": job.cfg.model}, "recipe": to_dict(job.cfg),
                                                  "data": job.data_meta, "training": stats,
                                                  "fingerprint": job.base_fingerprint or fingerprint(model)})
