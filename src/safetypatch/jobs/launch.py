"""`safetypatch train --launch ENGINE`: run the same `train` command under `accelerate launch` (the TRL habit), with
one of the shipped accelerate config files (src/safetypatch/launch/*.yaml).

    safetypatch train --launch ddp --num-processes 2 --out runs/x ...
      -> python -m accelerate.commands.launch --config_file .../ddp.yaml --num_processes 2 -m safetypatch train
         --out runs/x ...

Every check that can fail before a process starts does so here, with the fix: accelerate or DeepSpeed missing,
a sharded engine without GPUs, more processes than GPUs, a world size that does not divide the global batch.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..training.config import TrainConfig
from ..training.dev_checks import dev_prompts
from ..training.distributed import Ranks, check_batch
from ..training.examples import read_sources

LAUNCH_DIR = Path(__file__).resolve().parent.parent / "launch"
ENGINE_CONFIGS = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}
OWN_FLAGS = ("--launch", "--num-processes")  # this wrapper's flags, not passed on to the ranks


def config_file(engine: str) -> Path:
    """The shipped accelerate config for `engine`."""
    if engine not in ENGINE_CONFIGS:
        raise ConfigError(f"--launch {engine!r}: expected one of {sorted(ENGINE_CONFIGS)}")
    return LAUNCH_DIR / ENGINE_CONFIGS[engine]


def check_launch(engine: str, processes: int | None, gpus: int, cfg: TrainConfig) -> int:
    """The number of processes to start, after checking what the engine needs; ConfigError with the fix."""
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("--launch needs accelerate, which is not installed: pip install accelerate")
    if engine in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"--launch {engine} needs DeepSpeed, which is not installed: pip install deepspeed "
                          "(on a machine with CUDA), or use --launch ddp / fsdp")
    if engine == "fsdp" and gpus == 0:
        # accelerate engages FSDP on GPUs only (DeepSpeed has a CPU accelerator, over gloo)
        raise ConfigError("--launch fsdp shards the weights over GPUs and this machine has none; on a CPU use "
                          "--launch ddp (or zero2 / zero3 with DeepSpeed installed)")
    n = processes or gpus
    if not n:
        raise ConfigError("--launch ddp on a machine without GPUs: give the number of CPU processes with "
                          "--num-processes N")
    if gpus and n > gpus:
        raise ConfigError(f"--num-processes {n} is more than the {gpus} GPU(s) this machine has; use at most {gpus}")
    check_batch(cfg.batch_size, Ranks(world=n))
    return n


def rank_argv(argv: Sequence[str]) -> list[str]:
    """The command line each rank runs: this one without --launch / --num-processes (and their values)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in OWN_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def launch_command(engine: str, processes: int, argv: Sequence[str], bf16: str = "auto") -> list[str]:
    """accelerate's launcher (`--quiet`: a failing rank shows its own one-line error, not the launcher's stack);
    a recipe with `bf16: no` turns the sharded configs' bf16 mixed precision off too."""
    precision = ["--mixed_precision", "no"] if bf16 == "no" else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file(engine)),
            "--num_processes", str(processes), "--num_machines", "1", *precision, "--quiet", "-m", "safetypatch",
            *rank_argv(argv)]


def launch(engine: str, processes: int | None, cfg: TrainConfig, argv: Sequence[str]) -> int:
    """Run `argv` (a `safetypatch train` command line, whose recipe `cfg` is already validated) under accelerate
    with `engine`; returns the command's exit status (2 when the launched run failed)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = check_launch(engine, processes, gpus, cfg)
    read_sources(cfg)  # a bad data file is one line here, not one per rank
    dev_prompts(cfg.dev_harmful, cfg.dev_benign, cfg.dev_size, cfg.prompt_field)
    cmd = launch_command(engine, n, argv, cfg.bf16)
    print(f"launching {n} process(es) with accelerate ({engine}): {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
        print(f"error: the launched training failed (exit status {rc}); the first `error:` line above names the "
              "cause; fix it and rerun (with --resume to continue from the last checkpoint)", file=sys.stderr)
        return 2
    return 0
