"""Multi-process training under `accelerate launch` (or torchrun): which engine this process runs under, its rank,
and the few collective operations the trainer needs. One process (no launcher) is the engine "single", where every
operation here is the identity.

- **ddp** (data parallel; gloo on CPU, NCCL on GPU): every rank holds the whole model. `batch_size` stays the
  *global* micro-batch: each of N ranks takes a contiguous 1/N slice of it (`shard`), so a recipe means the same
  update whatever N is. Each rank divides its loss sum by the micro-batch's global response-token count
  (`all_sum`), and after the step's backward passes the trainable gradients are summed over ranks
  (`sync_gradients`), so the step equals one process's on the same global batch (tested to float tolerance).
  Written by hand rather than with torch's DistributedDataParallel wrapper: DDP arms its gradient hooks in the
  wrapper's forward, while the trainer's speed paths (training/speed.py) run the decoder stack directly; a patch's
  trainable tensors are small, so one all_reduce each per optimizer step costs little.
- **fsdp / deepspeed** (sharded weights; FSDP on GPUs only, DeepSpeed also on CPUs over gloo): the model and
  optimizer go through `Accelerator.prepare` (`prepare_sharded`); the speed paths, the dev checks and checkpoints
  step aside (`check_engine` says so), and the patch is gathered (`gathered_state`) and written by rank 0.

Anything that is done once (anchor answers, dev checks, logs, checkpoints, the patch) is done by rank 0: the
others wait (`main_first`, `barrier`) or receive its result (`broadcast`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

from ..errors import ConfigError

T = TypeVar("T")
SHARDED = ("fsdp", "deepspeed")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launched_engine() -> str:
    """The engine the launcher asked for, from its environment (accelerate sets ACCELERATE_USE_FSDP /
    ACCELERATE_USE_DEEPSPEED; a bare torchrun or `accelerate launch` with N > 1 processes is data parallel)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return "single"
    if env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"


@dataclass
class Ranks:
    """This process's place in the run: its rank among `world` processes, under `engine`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    engine: str = "single"
    accelerator: Any = None  # an accelerate.Accelerator under a sharded engine

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.engine in SHARDED

    @property
    def multi(self) -> bool:
        return self.world > 1

    def device(self) -> str | None:
        """The device this rank trains on (None: the trainer's default), one GPU per rank."""
        import torch

        if self.multi and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return "cpu" if self.multi else None

    def barrier(self) -> None:
        if self.multi:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. filling a cache), the others after it, reading what it wrote."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[None]:
        """Models loaded in this block keep all their weights on every rank: under ZeRO-3, accelerate has told
        transformers to partition weights as they load (zero.Init), which the anchors' generation and the LoRA
        initialisation before `prepare` cannot run on; `prepare` partitions them afterwards."""
        plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
        if plugin is None:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj`, on every rank (any picklable value this trainer made itself, never read from a file)."""
        if not self.multi:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The sum of `values` over ranks (element-wise)."""
        if not self.multi:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def sync_gradients(self, params: Sequence[Any]) -> None:
        """Sum each trainable parameter's gradient over ranks (a rank that saw no example adds zeros), in one
        all_reduce over the gradients laid end to end."""
        if not self.multi or self.sharded:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))

    def sync_parameters(self, params: Sequence[Any]) -> None:
        """Copy rank 0's values of `params` to every rank (after initialisation, like DDP's first broadcast)."""
        if not self.multi or self.sharded:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def collective_device(self) -> str:
        import torch.distributed as dist

        return f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"


def peer_failure(error: BaseException) -> str | None:
    """The one line for a rank whose collective broke because another rank stopped first (that rank printed the
    cause); None for any other error, or outside a launched run."""
    if launched_engine() == "single":
        return None
    text = str(error)
    if not any(s in text for s in ("closed by peer", "reset by peer", "Broken pipe", "Connection refused")):
        return None
    return (f"rank {os.environ.get('RANK', '?')} stopped: another rank of this run failed first (its error is "
            "above)")


def shard(idx: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous slice of a global micro-batch: sizes differ by at most one, and a rank may get
    none (the last, short batch of an epoch)."""
    n = len(idx)
    start = rank * (n // world) + min(rank, n % world)
    return list(idx[start: start + n // world + (1 if rank < n % world else 0)])


def current_ranks() -> Ranks:
    """This process's Ranks, initialising the process group when launched with more than one process."""
    engine = launched_engine()
    if engine == "single":
        return Ranks()
    if engine in SHARDED:
        return sharded_ranks(engine)
    import torch
    from accelerate import PartialState

    # joins the launcher's process group: NCCL with GPUs, gloo on CPU processes
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        raise ConfigError("launched with WORLD_SIZE > 1 but accelerate did not start a process group; launch with "
                          "`safetypatch train --launch ddp --num-processes N`")
    return Ranks(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index,
                 engine="ddp")


def sharded_ranks(engine: str) -> Ranks:
    """Ranks under FSDP / DeepSpeed: an Accelerator (which owns the sharding) is created here."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # without a GPU accelerate picks no backend and then reports a world of 1 while DeepSpeed runs 2; gloo fixes it
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(kwargs_handlers=handlers)
    if acc.num_processes <= 1 or str(acc.distributed_type).rsplit(".", 1)[-1].lower() != engine:
        # accelerate runs FSDP on GPUs only; on a CPU it quietly gives every process a whole model of its own
        raise ConfigError(f"--launch {'fsdp' if engine == 'fsdp' else 'zero2/zero3'}: accelerate did not start "
                          f"{engine} here (it ran {acc.distributed_type} with {acc.num_processes} process(es)); "
                          "FSDP needs CUDA GPUs: on a CPU use --launch ddp or zero2 / zero3")
    return Ranks(rank=acc.process_index, world=acc.num_processes, local_rank=acc.local_process_index,
                 engine=engine, accelerator=acc)


def check_batch(batch_size: int, ranks: Ranks) -> None:
    """The global micro-batch must split evenly over the ranks (each takes batch_size / N examples)."""
    if ranks.multi and batch_size % ranks.world:
        raise ConfigError(f"--batch-size {batch_size} is the global micro-batch and must split evenly over "
                          f"{ranks.world} processes; use a multiple of {ranks.world} (e.g. "
                          f"{ranks.world * max(1, batch_size // ranks.world)}), or --num-processes dividing it")


def check_engine(cfg: Any, ranks: Ranks, resume: bool) -> None:
    """ConfigError for what a sharded engine cannot do in this trainer, and one line each for what steps aside."""
    if not ranks.sharded:
        return
    if resume:
        raise ConfigError(f"--resume under {ranks.engine}: checkpoints are written by the single-process and ddp "
                          "engines only; restart the run into a new --out, or train with --launch ddp")
    if cfg.overlap_beta > 0:
        raise ConfigError(f"--overlap-beta under {ranks.engine}: the overlap regularizer reads whole weight "
                          "matrices, which a rank holding a shard does not have; set it to 0 or use --launch ddp")
    if ranks.engine == "deepspeed" and cfg.grad_accum > 1:
        raise ConfigError("--grad-accum under DeepSpeed: DeepSpeed steps the optimizer itself on every backward "
                          "here; use a larger --batch-size instead (the global micro-batch)")
    if ranks.main:
        print(f"{ranks.engine}: the speed paths (prefix cache, shared prompt prefix, response-only logits), dev "
              "checks and checkpoints step aside under sharded weights; the run trains its full schedule and "
              "saves the last step's patch (evaluate it with `safetypatch eval`)", file=sys.stderr)
    for name in SPEED_FIELDS_OFF:
        setattr(cfg, name, False)


# recipe switches turned off under a sharded engine: each runs part of the model by hand, outside its wrapper
SPEED_FIELDS_OFF = ("cache_frozen_prefix", "share_prompt_prefix", "response_only_logits", "bf16_frozen_weights")


def prepare_sharded(model: Any, optimizer: Any, ranks: Ranks, micro_batch: int) -> tuple[Any, Any]:
    """The model and optimizer wrapped by the sharded engine; under FSDP with PEFT's auto-wrap policy (each LoRA
    layer and each decoder block its own unit), as PEFT's FSDP guide does; DeepSpeed is given `micro_batch`
    examples per rank (the global micro-batch over the ranks)."""
    acc = ranks.accelerator
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is not None:
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # no dataloader goes through prepare, so DeepSpeed is told the per-rank batch here
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
        ds.deepspeed_config["train_batch_size"] = micro_batch * ranks.world
    return acc.prepare(model, optimizer)


def gathered_state(model: Any, ranks: Ranks) -> tuple[Any, dict[str, Any] | None]:
    """(the model to save from, its gathered full state dict or None). Under a sharded engine every rank takes part
    in the gather (`Accelerator.get_state_dict`; ZeRO-3 needs `stage3_gather_16bit_weights_on_model_save`), and the
    model returned is the unwrapped one, whose own parameters are shards and must not be read."""
    if not ranks.sharded:
        return model, None
    state = ranks.accelerator.get_state_dict(model)
    return ranks.accelerator.unwrap_model(model), state
