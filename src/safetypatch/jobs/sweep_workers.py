"""`safetypatch sweep --jobs N`: N points at once, one per GPU, each in a process of its own.

Each worker is `safetypatch sweep SWEEP --out OUT --only POINT` (with the parent's --quick / --model / --data-root
/ --db) under CUDA_VISIBLE_DEVICES=<gpu>, so a point sees one device and runs exactly as in a serial sweep (same
directories, same resume). Its output goes to OUT/points/POINT/worker.log; the parent keeps the overall bar.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .sweep_spec import Plan, SweepConfig, point_dir, point_status


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(jobs: int) -> int:
    """The GPU count, or a ConfigError when it is below `jobs`."""
    n = gpu_count()
    if n < jobs:
        raise ConfigError(f"--jobs {jobs} runs one point per GPU, and this machine has {n}; use --jobs 1 (points "
                          "one after another)")
    return n


def worker_command(cfg: SweepConfig, out: Path, point: str) -> list[str]:
    cmd = [sys.executable, "-m", "safetypatch", "sweep", cfg.sweep, "--out", str(out), "--only", point]
    cmd += ["--quick"] if cfg.quick else []
    for flag, value in (("--model", cfg.model), ("--data-root", cfg.data_root), ("--db", cfg.db)):
        cmd += [flag, value] if value else []
    return cmd


def run_parallel(plan: Plan, cfg: SweepConfig, out: Path, devices: list[str] | None = None) -> None:
    """Run the plan's unfinished points, at most one per device at a time; `devices` defaults to the GPUs
    (CUDA_VISIBLE_DEVICES values). A worker that fails is reported with its log; the others go on."""
    from tqdm.auto import tqdm


    devices = devices if devices is not None else [str(i) for i in range(check_gpus(cfg.jobs))]
    todo = [p for p in plan.points if point_status(out, p) != "done"]
    free, running, failed = devices[: cfg.jobs], {}, []
    bar = tqdm(total=len(todo), desc=f"sweep {plan.spec.name} ({cfg.jobs} jobs)", unit="point")
    with bar:
        while todo or running:
            while todo and free:
                p, dev = todo.pop(0), free.pop(0)
                log = point_dir(out, p.name) / "worker.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as f:
                    proc = subprocess.Popen(worker_command(cfg, out, p.name), stdout=f, stderr=subprocess.STDOUT,
                                            env={**os.environ, "CUDA_VISIBLE_DEVICES": dev})
                running[proc] = (p.name, dev, log)
            time.sleep(0.5)
            for proc in [q for q in running if q.poll() is not None]:
                name, dev, log = running.pop(proc)
                free.append(dev)
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(f"{name} (exit {proc.returncode}; see {log})")
    if failed:
        raise ConfigError(f"{len(failed)} point(s) failed: {'; '.join(failed)}; rerun the sweep to retry them "
                          "(finished points are skipped)")
