"""Training throughput: safetypatch's trainer against TRL's SFTTrainer + PEFT on the same recipe, data and tokens.

Both sides train the demo recipe (TrainConfig defaults: LoRA on up_proj of the middle layers, LDA-initialised A
kept frozen, batch 8, cosine schedule with warmup, AdamW, grad-norm clip 1.0, bf16 autocast where the CPU has
native bf16) on the same examples (built-in harmful train refusals + benign anchors answered by the base model),
in the same batches, in the same order, from the same initial adapter, with the same objective (the recipe's
per-token weights: anchors x benign_weight, the first decision_tokens of a response x decision_weight):

- safetypatch: `SpeedPaths` + `train_step` from safetypatch.training (what `train()` runs, without the dev checks);
- TRL: `SFTTrainer` (its fused LM head: log-probs of completion tokens only, no full logits) on a `PeftModel`
  built from peft's `LoraConfig` with the same rank / alpha / target modules / layers; pre-tokenized input_ids
  with completion-only labels (`skip_prepare_dataset`); `compute_loss` is overridden only to apply the recipe's
  per-token weights to TRL's per-token log-probs.

Two baselines (`--baseline`):
- `shipped` (default): TRL as `SFTTrainer(peft_config=...)` runs out of the box (the issue's baseline: "SFTTrainer
  with a peft_config"): SFTConfig's defaults for everything the recipe does not fix (gradient checkpointing on), in a
  spawned process of its own, so with glibc's default allocator as a TRL user has it (safetypatch's `tune_malloc`
  is process-wide, so TRL as shipped cannot share our process). The two processes alternate in lockstep over a
  pipe, in chunks of `--chunk` optimizer steps: one waits while the other runs.
- `tuned`: the strongest TRL setup we found, in this process: gradient checkpointing off (it trades speed for
  memory, and safetypatch does not use it) and the same allocator settings as safetypatch. The two alternate in
  chunks (a callback pauses TRL's loop and runs safetypatch's next chunk). This isolates what the trainer itself
  gains; `--set tune_malloc=false` runs both under glibc's defaults instead.

Either way a change in machine load hits both. Tokens are counted the same way on both sides: the non-padding
tokens of each batch. Dev checks (generation for early stopping) are left out of both.

    python benchmarks/train_throughput.py                       # full demo recipe (3 epochs; long on a CPU)
    python benchmarks/train_throughput.py --steps 30            # first 30 steps of it (schedule shortened to 30)
    python benchmarks/train_throughput.py --baseline tuned       # against TRL tuned as far as we could
    python benchmarks/train_throughput.py --examples 64 --steps 8 --model path/to/tiny-model   # smoke test

The last line reads `speedup N.NNx over TRL+PEFT (loss A vs B)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from typing import Any, Callable


def matmul_rate(dtype: Any, n: int = 1024, seconds: float = 1.5) -> float:
    """Best FLOP/s of an n x n x n torch.matmul in `dtype` on this machine, with the current thread count."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _layer_sizes(model: Any) -> tuple[list[int], int, int]:
    """Weights of the linear layers of each decoder layer, d_attn = heads x head_dim, and the LM head's size."""
    from safetypatch.modeling import decoder_layers, unwrap_lm

    lm = unwrap_lm(model)
    cfg = lm.config
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    layer_params = []
    for layer in decoder_layers(model):
        p = 0
        for name, mod in layer.named_modules():
            w = getattr(mod, "weight", None)
            if w is not None and w.ndim == 2 and "lora_" not in name:
                p += w.numel()
        layer_params.append(p)
    return layer_params, d_attn, lm.get_output_embeddings().weight.numel()


def recipe_flops(sizes: tuple[list[int], int, int], examples: list[Any], first_trained: int, *,
                 cached_below: bool = False,
                 shared: int = 0) -> float:
    """Model FLOPs of one pass of the recipe over `examples` (the same count for both trainers).

    Per example of n tokens with r loss targets, d_attn = heads x head_dim, P_l = weights of the linear layers of
    decoder layer l, V x d = LM head:
      forward:  sum_l (2 P_l n + 2 n^2 d_attn)       every layer's matmuls + causal attention (QK^T, AV: half of n^2)
                + 2 V d r                              LM head on the positions that predict a response token
      backward: sum_{l >= first_trained} (2 P_l n + 4 n^2 d_attn)    input gradients only: the base weights are
                + 2 V d r                                            frozen, so no weight gradients (the usual 6N
                                                                     assumes them: 2N forward + 4N backward)
    LoRA's rank-r products are negligible. Layers below the first trained layer need no backward at all. This is
    the work of the recipe, so the % of the machine is comparable across trainers.

    What safetypatch's trainer executes per step is less (`executed`: cached_below=True, shared=N, with `examples`
    one batch): the layers below the first trained one are not run (the frozen-prefix cache, built once, is
    counted separately), and the N prompt-prefix tokens every row shares go through the trained layers once per
    batch instead of once per row.
    """
    layer_params, d_attn, head = sizes  # _layer_sizes(model), computed once by the caller
    total = 0.0
    for row, e in enumerate(examples):
        n, r = len(e.input_ids), e.n_response
        own = n - shared if row else n  # tokens this row runs through the layers above the cache
        attn = n * n - (shared * shared if row else 0)
        for i, p in enumerate(layer_params):
            if i < first_trained and cached_below:
                continue
            total += 2 * p * own + 2 * attn * d_attn
            if i >= first_trained:
                total += 2 * p * own + 4 * attn * d_attn
        total += 4 * head * r
    return total


def prefix_cache_flops(sizes: tuple[list[int], int, int], examples: list[Any], first_trained: int) -> float:
    """Forward FLOPs of the layers below the first trained one over every example: the cache's one-off build."""
    layer_params, d_attn, _ = sizes
    return sum(2 * p * len(e.input_ids) + 2 * len(e.input_ids) ** 2 * d_attn
               for e in examples for p in layer_params[:first_trained])


def token_weights(cfg: Any, batch: dict[str, Any]) -> Any:
    """Per-target weights of the recipe aligned with labels[:, 1:] (zero where there is no target)."""
    import torch

    from safetypatch.data.chat import IGNORE_INDEX
    from safetypatch.training.loss import response_positions

    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    w = torch.zeros(mask.shape)
    vals = torch.where(batch["is_anchor"].bool()[:, None].expand_as(mask)[mask],
                       torch.tensor(cfg.benign_weight), torch.tensor(1.0))
    if cfg.decision_tokens > 0 and cfg.decision_weight != 1.0:
        vals = torch.where(response_positions(batch) < cfg.decision_tokens, vals * cfg.decision_weight, vals)
    w[mask] = vals
    return w


def run_trl(job: dict[str, Any], init_state: dict[str, Any], on_turn: Callable[[], None]) -> tuple[float, list[float]]:
    """Train the TRL side of the comparison: SFTTrainer on a PeftModel with the recipe's shape, from `init_state`,
    over `job["order"]` batches of `job["examples"]`; `on_turn()` runs after every `job["chunk"]` steps (the other
    trainer's turn). Returns TRL's training seconds without the turns, and its per-step losses."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from safetypatch.training.config import TrainConfig
    from safetypatch.config import from_dict
    from safetypatch.data.chat import IGNORE_INDEX, Encoded
    from safetypatch.modeling import load_model
    from safetypatch.patches import lora_config
    from safetypatch.training.examples import collate

    cfg = from_dict(TrainConfig, job["cfg"])
    examples = [Encoded(**e) for e in job["examples"]]
    order, pad_id, chunk = job["order"], job["pad_id"], job["chunk"]
    base, tok = load_model(cfg.model)
    theirs = get_peft_model(base, lora_config(cfg.shape(), base))  # peft LoraConfig, same shape (roles resolved)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(init_state[n])
                if cfg.freeze_a and "lora_A" in n:
                    p.requires_grad_(False)
    ds = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels, "idx": i} for i, e in enumerate(examples)])

    def trl_collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        b = collate(examples, [r["idx"] for r in rows], pad_id)  # same right padding, same tokens
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"],
                "loss_weights": token_weights(cfg, b)}

    class Trainer(SFTTrainer):
        def get_train_dataloader(self):  # our batches, in our order
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=order,
                                                       collate_fn=self.data_collator))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("loss_weights")
            inputs["use_cache"] = False
            out = model(**inputs, fused_lm_head=True)  # TRL's own path: per-token log-probs, no full logits
            n = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            loss = (-out.log_probs * weights.to(out.log_probs.dtype)).sum() / n
            self._total_train_tokens += int(inputs["attention_mask"].sum())
            return (loss, out) if return_outputs else loss

    log_trl: list[float] = []
    pause = [0.0]

    class Alternate(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step % chunk == 0:
                t = time.perf_counter()
                on_turn()
                pause[0] += time.perf_counter() - t

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log_trl.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out_dir:
        targs = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
            learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule if cfg.schedule != "constant" else
            "constant_with_warmup", warmup_steps=job["warmup"], max_steps=job["total_steps"],
            weight_decay=cfg.weight_decay, max_grad_norm=1.0, optim="adamw_torch", bf16=job["use_bf16"],
            use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed,
            remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
            dataloader_num_workers=0,
            # shipped: SFTConfig's own default (on: it trades speed for memory); tuned: off, as safetypatch runs
            **({} if job["baseline"] == "shipped" else {_checkpointing_field(SFTConfig): False}),
        )
        trainer = Trainer(model=theirs, args=targs, train_dataset=ds, processing_class=tok,
                          data_collator=trl_collate, callbacks=[Alternate()])
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
        t = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t - pause[0], log_trl


def _checkpointing_field(config_class: Any) -> str:
    """The TrainingArguments field that turns activation checkpointing off (renamed in transformers 5.x)."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _trl_child(conn: Any, job: dict[str, Any], init_path: str) -> None:
    """The TRL side in its own process (baseline `shipped`): a fresh interpreter, so glibc's default allocator
    settings, as a TRL user has them. Lockstep with the parent: after each chunk it hands the turn over and waits."""
    import torch
    from safetensors.torch import load_file

    if job["threads"]:
        torch.set_num_threads(job["threads"])

    def on_turn() -> None:
        conn.send(("turn",))
        conn.recv()

    secs, losses = run_trl(job, load_file(init_path), on_turn)
    conn.send(("done", secs, losses))


def _trl_in_child(job: dict[str, Any], init_state: dict[str, Any], on_turn: Callable[[], None]
                  ) -> tuple[float, list[float]]:
    """Run `run_trl` in a spawned process (a fresh interpreter: no inherited allocator settings) and take its
    turns here: whenever it hands over, `on_turn()` runs while it waits, so the two never run at once."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        init_path = os.path.join(tmp, "init.safetensors")
        save_file({k: v.contiguous() for k, v in init_state.items()}, init_path)
        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe()
        child = ctx.Process(target=_trl_child, args=(there, job, init_path), daemon=True)
        child.start()
        try:
            while True:
                if not here.poll(5):
                    if not child.is_alive():
                        raise RuntimeError(f"the TRL process exited with code {child.exitcode} (its error is above)")
                    continue
                msg = here.recv()
                if msg[0] == "done":
                    return msg[1], msg[2]
                on_turn()
                here.send(("go",))
        finally:
            here.close()  # a child still waiting for its turn (we failed) gets EOF and exits
            child.join(timeout=30)
            if child.is_alive():
                child.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="hub id, local dir, .gguf or 'default' (embedded SmolLM2)")
    ap.add_argument("--examples", type=int, default=0, help="use a random subset of N training examples (0: all)")
    ap.add_argument("--steps", type=int, default=0, help="train N optimizer steps (0: the recipe's epochs); the "
                                                          "LR schedule is fitted to the steps trained")
    ap.add_argument("--chunk", type=int, default=5, help="steps per turn when alternating the two trainers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--baseline", choices=("shipped", "tuned"), default="shipped",
                    help="shipped: TRL as SFTTrainer(peft_config=...) runs out of the box (SFTConfig defaults: "
                         "gradient checkpointing on) in a process of its own with glibc's default allocator, in "
                         "lockstep with this one; tuned: TRL in this process under the same allocator settings, "
                         "gradient checkpointing off (the strongest TRL setup we found)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field of the recipe (repeatable), e.g. --set cache_frozen_prefix=false")
    args = ap.parse_args(argv)

    import torch
    from transformers import get_scheduler

    from safetypatch.config import from_dict, to_dict
    from safetypatch.modeling import load_model
    from safetypatch.training.config import TrainConfig, use_bf16 as bf16_setting
    from safetypatch.training.examples import batches, build_examples
    from safetypatch.training.forward import first_trained_layer
    from safetypatch.training.lora_init import contrast_init
    from safetypatch.training.speed import SpeedPaths
    from safetypatch.training.step import prepare_model, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = from_dict(TrainConfig, {**to_dict(TrainConfig()), "model": args.model, **overrides})
    if cfg.method != "lora" or cfg.benign_loss != "ce" or cfg.grad_accum != 1 or cfg.overlap_beta:
        sys.exit("this benchmark compares LoRA training with the CE anchor loss, grad_accum 1, no overlap term")
    device = "cpu"
    use_bf16 = bf16_setting(cfg.bf16, device)
    malloc = "default"
    if cfg.tune_malloc:  # process-wide: set here, before either trainer runs, so with `tuned` both train under it
        from safetypatch.training.malloc import tune_malloc

        malloc = tune_malloc()
    torch.manual_seed(cfg.seed)

    # ---- data and initial adapter, shared by both trainers
    model, tok = load_model(cfg.model)
    examples, _, sources = build_examples(cfg, model, tok)
    if args.examples and args.examples < len(examples):
        examples = random.Random(cfg.seed).sample(examples, args.examples)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    recipe_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    total_steps = min(args.steps, recipe_steps) if args.steps else recipe_steps
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_steps:
        order += batches(examples, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
        epoch += 1
    order = order[:total_steps]

    ours = prepare_model(cfg, model)
    if cfg.init in ("contrast", "lda"):
        contrast_init(ours, tok, sources["refusal"], sources["anchor"], lda=cfg.init == "lda")
    init_state = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n}
    if cfg.freeze_a:
        for n, p in ours.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)

    first = first_trained_layer(ours)
    warmup = int(cfg.warmup_ratio * total_steps)

    # ---- safetypatch side: a generator that trains one step per next()
    log_ours: list[float] = []
    tok_ours = [0]
    sp_info: dict[str, Any] = {}

    def ours_steps():
        ours.train()
        params = [p for p in ours.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", opt,
                              num_warmup_steps=warmup, num_training_steps=total_steps)
        with SpeedPaths(ours, cfg, examples, device, use_bf16, pad_id) as sp:
            print(f"safetypatch speed paths: {sp.describe()}", file=sys.stderr)
            if sp.prefix is not None and sp.prefix.active:
                sp_info.update(prefix_start=sp.prefix.start, shared=sp.shared)
            for idx in order:
                loss, _, n = train_step(ours, [sp.collate(idx)], cfg, opt, sched, params, device=device,
                                        use_bf16=use_bf16)
                log_ours.append(loss)
                tok_ours[0] += n
                yield

    ours_iter = ours_steps()
    t_ours = [0.0]

    def run_ours(k: int) -> None:
        t = time.perf_counter()
        for _ in range(k):
            if next(ours_iter, "done") == "done":
                break
        t_ours[0] += time.perf_counter() - t

    # ---- TRL side
    job = {"cfg": to_dict(cfg), "examples": [dataclasses.asdict(e) for e in examples], "order": order,
           "pad_id": pad_id, "chunk": args.chunk, "warmup": warmup, "total_steps": total_steps,
           "use_bf16": use_bf16, "baseline": args.baseline, "threads": args.threads}
    if args.baseline == "tuned":
        t_trl, log_trl = run_trl(job, init_state, lambda: run_ours(args.chunk))
    else:
        t_trl, log_trl = _trl_in_child(job, init_state, lambda: run_ours(args.chunk))
    run_ours(total_steps)  # whatever is left of safetypatch's steps
    tokens = sum(len(examples[i].input_ids) for b in order for i in b)
    assert tok_ours[0] == tokens, (tok_ours[0], tokens)

    # ---- report
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    sizes = _layer_sizes(ours)
    flops = sum(recipe_flops(sizes, [examples[i] for i in b], first) for b in order)
    cached = shared = 0
    if sp_info.get("prefix_start") is not None:  # what our trainer actually executed (see recipe_flops)
        cached, shared = sp_info["prefix_start"], sp_info["shared"]
        executed = prefix_cache_flops(sizes, examples, cached) + sum(
            recipe_flops(sizes, [examples[i] for i in b], first, cached_below=True, shared=shared) for b in order)
    else:
        executed = flops
    tail = max(1, min(10, total_steps // 5))
    la, lb = sum(log_ours[-tail:]) / tail, sum(log_trl[-tail:]) / max(1, len(log_trl[-tail:]))
    sa, sb = tokens / t_ours[0], tokens / t_trl
    equal = abs(la - lb) <= 0.02 * max(abs(lb), 1e-12)
    print(f"model {cfg.model}; {len(examples)} examples; {total_steps} steps of batch {cfg.batch_size}; "
          f"{tokens} tokens; bf16 autocast {use_bf16}; torch threads {torch.get_num_threads()}")
    where, gc, trl_malloc = (("this process", "off", malloc) if args.baseline == "tuned" else
                             ("a process of its own", "on (SFTConfig default)", "default (own process)"))
    print(f"baseline {args.baseline}: TRL in {where}, gradient checkpointing {gc}; allocator: safetypatch {malloc}, "
          f"TRL {trl_malloc}")
    print(f"machine: fp32 matmul {fp32 / 1e9:.0f} GFLOP/s, bf16 matmul {bf16 / 1e9:.0f} GFLOP/s "
          f"(best {1024}^3 torch.matmul)")
    print(f"recipe model FLOPs: {flops / tokens / 1e6:.0f} MFLOP/token (forward all layers + input-gradient "
          f"backward from layer {first}; see recipe_flops)")
    for name, secs, loss in (("safetypatch", t_ours[0], la), ("TRL+PEFT", t_trl, lb)):
        rate = flops / secs
        print(f"{name:12s} {tokens / secs:8.1f} tokens/s  {secs:8.1f} s  final loss {loss:.4f} (mean of last "
              f"{tail} steps)  {rate / 1e9:6.1f} GFLOP/s = {rate / bf16:.1%} of bf16, {rate / fp32:.1%} of fp32 matmul")
    if executed != flops:
        rate = executed / t_ours[0]
        print(f"safetypatch executed {executed / tokens / 1e6:.0f} MFLOP/token of it (layers 0-{cached - 1} once per "
              f"example for the prefix cache, the {shared} shared prompt-prefix tokens once per batch): "
              f"{rate / 1e9:.1f} GFLOP/s = {rate / bf16:.1%} of bf16, {rate / fp32:.1%} of fp32 matmul")
    peak = bf16 if use_bf16 else fp32
    ceiling = tokens / (executed / peak)  # every executed FLOP at the large-matmul rate, nothing else
    print(f"ceiling: safetypatch's executed work at the full {'bf16' if use_bf16 else 'fp32'} matmul rate, with no "
          f"other cost, would run {ceiling:.0f} tokens/s = {ceiling / sb:.2f}x this TRL run")
    print(f"loss curves: first steps ours {[round(x, 3) for x in log_ours[:3]]} vs TRL {[round(x, 3) for x in log_trl[:3]]}")
    print(f"equal loss within 2%: {'yes' if equal else 'NO (the ratio does not count)'} "
          f"({abs(la - lb) / max(abs(lb), 1e-12):.2%} apart)")
    print(f"speedup {sa / sb:.2f}x over TRL+PEFT (loss {la:.4f} vs {lb:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
