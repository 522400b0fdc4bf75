"""Checkpoints and resume: trainable weights, optimizer moments and loop state in `RUN/checkpoint/`, all
safetensors + JSON (no pickle), and the check that a resumed run uses the recipe it was started with.

A resume is robust: a damaged or truncated checkpoint (or train_config.json) is a DataError naming the file and the
way on, never a traceback; the log lines written after the checkpoint are dropped before the run appends again, so
train_log.jsonl and dev_log.jsonl never repeat a step (a partial last line from a killed writer is dropped too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..errors import ConfigError, DataError
from ..io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text, staged_dir
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
LOGS = ("train_log.jsonl", "dev_log.jsonl")  # one JSON object per line, each with the step it was written at
# what state.json holds (the loop state a resume restores)
STATE_KEYS = ("step", "tokens", "history", "base_benign", "scheduler", "opt_param_groups")
# fields added after runs were started that do not change the recipe (speed paths): a resumed run may lack them
SPEED_FIELDS = ("cache_frozen_prefix", "prefix_cache_dtype", "prefix_cache_max_mb", "bf16_frozen_weights",
                "train_attention", "share_prompt_prefix")


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / "state.json").exists()


def damaged(path: Path, problem: str) -> DataError:
    """The error for a checkpoint file that cannot be read back, with the two ways on."""
    ck = path.parent
    return DataError(f"{path}: {problem}; the run cannot resume from this checkpoint. Delete {ck} to restart the "
                     f"run from step 0 (same --out, with --resume), or train without --resume into a new --out")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file the run wrote; None when the file is not one (damaged, truncated, not UTF-8)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_resume_recipe(run_dir: Path, cfg: TrainConfig) -> None:
    """ConfigError (a ValueError) naming the fields when `cfg` differs from the run's saved train_config.json."""
    saved = read_json_object(run_dir / "train_config.json")
    if saved is None:
        raise DataError(f"{run_dir / 'train_config.json'}: damaged (not a JSON object), so the run's recipe cannot "
                        f"be checked; train without --resume into a new --out (or delete {run_dir})")
    now = to_dict(cfg)
    defaults = to_dict(type(cfg)())
    # fields added after a run was started (speed paths, or any left at its default) do not make its recipe different
    compared = {k: v for k, v in now.items() if k in saved or (k not in SPEED_FIELDS and v != defaults.get(k))}
    if saved != compared:
        diff = sorted(k for k in set(saved) | set(compared) if saved.get(k) != compared.get(k))
        raise ConfigError(f"{run_dir}: --resume with a different recipe (fields {diff}); use the same flags")


def trained_parameters(model: Any) -> dict[str, Any]:
    """The trained parameters by name: every trainable one and every LoRA tensor (a frozen A is part of the patch)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}


def trainable_state(model: Any) -> dict[str, Any]:
    """A copy of the trained tensors (`trained_parameters`)."""
    return {n: p.detach().clone() for n, p in trained_parameters(model).items()}


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    """Copy `state` (from trainable_state) into the model's parameters."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    best: dict[str, Any] | None) -> None:
    """Trainable weights, optimizer moments and loop state, all safetensors + JSON (no pickle). The two files are
    written into a staged directory that replaces the checkpoint in one swap, so a kill never leaves the weights of
    one step beside the loop state of another."""
    from safetensors.torch import save as st_save

    tensors = {f"param/{n}": t.contiguous() for n, t in trainable_state(model).items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt/{pid}/{k}"] = v.detach().reshape(v.shape).contiguous() if v.ndim else v.reshape(1)
    if best is not None:
        tensors.update({f"best/{n}": t.contiguous() for n, t in best["state"].items()})
    meta = dict(state, scheduler=scheduler.state_dict(),
                opt_param_groups=opt["param_groups"],
                best={k: v for k, v in (best or {}).items() if k != "state"} if best else None)
    with staged_dir(run_dir / CHECKPOINT_DIR, overwrite=True) as ck:
        atomic_write_bytes(ck / "state.safetensors", st_save(tensors))
        atomic_write_json(ck / "state.json", meta)


def load_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], dict | None]:
    """Restore what save_checkpoint wrote (and reseed torch as the loop was at that step); returns (loop state,
    best dev check with its weights, or None). A damaged or truncated checkpoint is a DataError naming the file and
    the way on."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ck = run_dir / CHECKPOINT_DIR
    meta = read_json_object(ck / "state.json")
    missing = [k for k in STATE_KEYS if k not in meta] if meta is not None else list(STATE_KEYS)
    if missing or not isinstance(meta.get("step"), int):  # type: ignore[union-attr]
        raise damaged(ck / "state.json", f"damaged (not the JSON a checkpoint writes; lacks {missing or 'step'})")
    try:
        tensors = load_file(ck / "state.safetensors")
    except (SafetensorError, OSError) as e:
        raise damaged(ck / "state.safetensors", f"cannot be read ({e})") from None
    try:
        restore_state(meta, tensors, model, optimizer, scheduler)
        best = None
        if meta.get("best"):
            best = dict(meta["best"], state={k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")})
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        raise damaged(ck / "state.safetensors", f"does not match this run's model and optimizer ({e!r})") from None
    torch.manual_seed(meta.get("seed", 0) + meta["step"])
    return meta, best


def restore_state(meta: dict[str, Any], tensors: dict[str, Any], model: Any, optimizer: Any, scheduler: Any) -> None:
    """Trainable weights, optimizer moments and the schedule from a checkpoint's tensors and state.json."""
    load_trainable(model, {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = v if name != "step" else v.reshape(())
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["opt_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])


def log_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a run log, one per line; a line that does not parse (the partial last line of a killed
    run) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_logs(run_dir: Path, step: int) -> None:
    """Drop the log lines written after the checkpoint a run resumes from (at step `step`; 0: a fresh start, whose
    loop logs its step-0 dev check again), so the resumed run's lines do not repeat steps."""
    for name in LOGS:
        path = run_dir / name
        if path.exists():
            kept = [r for r in log_rows(path) if step > 0 and isinstance(r.get("step"), int) and r["step"] <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def last_logged_loss(run_dir: Path, step: int) -> float | None:
    """The loss train_log.jsonl recorded for `step` (the last such line), or None."""
    rows = log_rows(run_dir / "train_log.jsonl")
    return next((r.get("loss") for r in reversed(rows) if r.get("step") == step), None)
