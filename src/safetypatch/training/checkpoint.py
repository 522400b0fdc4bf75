"""Checkpoints and resume: trainable weights, optimizer moments and loop state in `RUN/checkpoint/`, all
safetensors + JSON (no pickle), and the check that a resumed run uses the recipe it was started with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..errors import ConfigError
from ..io_utils import atomic_write_bytes, atomic_write_json
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
# fields added after runs were started that do not change the recipe (speed paths): a resumed run may lack them
SPEED_FIELDS = ("cache_frozen_prefix", "prefix_cache_dtype", "prefix_cache_max_mb", "bf16_frozen_weights",
                "train_attention", "share_prompt_prefix")


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / "state.json").exists()


def check_resume_recipe(run_dir: Path, cfg: TrainConfig) -> None:
    """ConfigError (a ValueError) naming the fields when `cfg` differs from the run's saved train_config.json."""
    saved = json.loads((run_dir / "train_config.json").read_text())
    now = to_dict(cfg)
    # speed-path fields added after a run was started do not make its recipe different
    if saved != {k: v for k, v in now.items() if k in saved or k not in SPEED_FIELDS}:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                      and (k in saved or k not in SPEED_FIELDS))
        raise ConfigError(f"{run_dir}: --resume with a different recipe (fields {diff}); use the same flags")


def trainable_state(model: Any) -> dict[str, Any]:
    """Trained tensors: every trainable parameter and every LoRA tensor (a frozen A is part of the patch too)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    """Copy `state` (from trainable_state) into the model's parameters."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    best: dict[str, Any] | None) -> None:
    """Trainable weights, optimizer moments and loop state, all safetensors + JSON (no pickle)."""
    from safetensors.torch import save as st_save

    ck = run_dir / CHECKPOINT_DIR
    ck.mkdir(exist_ok=True)
    tensors = {f"param/{n}": t.contiguous() for n, t in trainable_state(model).items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt/{pid}/{k}"] = v.detach().reshape(v.shape).contiguous() if v.ndim else v.reshape(1)
    if best is not None:
        tensors.update({f"best/{n}": t.contiguous() for n, t in best["state"].items()})
    atomic_write_bytes(ck / "state.safetensors", st_save(tensors))
    meta = dict(state, scheduler=scheduler.state_dict(),
                opt_param_groups=opt["param_groups"],
                best={k: v for k, v in (best or {}).items() if k != "state"} if best else None)
    atomic_write_json(ck / "state.json", meta)


def load_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], dict | None]:
    """Restore what save_checkpoint wrote (and reseed torch as the loop was at that step); returns (loop state,
    best dev check with its weights, or None)."""
    import torch
    from safetensors.torch import load_file

    ck = run_dir / CHECKPOINT_DIR
    meta = json.loads((ck / "state.json").read_text())
    tensors = load_file(ck / "state.safetensors")
    load_trainable(model, {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = v if name != "step" else v.reshape(())
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["opt_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    best = None
    if meta.get("best"):
        best = dict(meta["best"], state={k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")})
    torch.manual_seed(meta.get("seed", 0) + meta["step"])
    return meta, best


def last_logged_loss(run_dir: Path, step: int) -> float | None:
    """The loss train_log.jsonl recorded for `step` (the last such line), or None."""
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return next((r["loss"] for r in reversed(rows) if r.get("step") == step), None)
