"""lm-evaluation-harness adapter: any of its tasks on a base model with a patch attached through its `peft=` argument.

    run_lm_eval("default", patch="runs/p1/patch", tasks=["arc_easy"])
    # == lm_eval.simple_evaluate(model="hf", model_args="pretrained=<dir>,peft=runs/p1/patch", tasks=["arc_easy"])

For the embedded default (and any .gguf), `pretrained` is the cached safetensors directory from
`safetypatch.modeling.model_directory`. lm-eval is an optional extra: `pip install 'safetypatch[lm-eval]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .. import modeling
from ..errors import LMEvalUnavailable, ModelError

LM_EVAL_INSTALL_HINT = "pip install 'safetypatch[lm-eval]' (or pip install lm-eval)"


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise LMEvalUnavailable(f"lm-evaluation-harness is not installed: {LM_EVAL_INSTALL_HINT}") from None
    return lm_eval


def _arg_value(key: str, value: str) -> str:
    # lm-eval splits model_args on ',' and '=': a value holding either cannot be passed through that string
    if "," in value or "=" in value:
        raise ModelError(f"lm-eval model_args: {key}={value!r} contains ',' or '=', which lm-eval's argument string "
                         "cannot carry; move or symlink it to a path without them")
    return value


def model_args(model: str = "default", patch: str | Path | None = None, dtype: str | None = None,
               extra: dict[str, Any] | None = None) -> str:
    """The `model_args` string for lm-eval's "hf" model: pretrained=DIR[,peft=PATCH][,dtype=..][,k=v...]."""
    pairs = {"pretrained": modeling.model_directory(model)}
    if patch is not None:
        from ..patches import check_adapter_dir

        pairs["peft"] = str(check_adapter_dir(patch))
    if dtype:
        pairs["dtype"] = dtype
    for k, v in (extra or {}).items():
        pairs[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return ",".join(f"{k}={_arg_value(k, v)}" for k, v in pairs.items())


def simple_evaluate_kwargs(model: str = "default", patch: str | Path | None = None,
                           tasks: str | Sequence[str] = ("arc_easy",), num_fewshot: int | None = None,
                           batch_size: int | str = 1, device: str | None = None, limit: int | float | None = None,
                           dtype: str | None = None, seed: int | None = None,
                           extra_model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for `lm_eval.simple_evaluate` (model="hf", model_args with peft=PATCH)."""
    task_list = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    task_list = [t for t in task_list if t]
    if not task_list:
        raise ValueError("lm-eval: no tasks given (e.g. tasks=['arc_easy', 'hellaswag'])")
    kwargs: dict[str, Any] = {
        "model": "hf",
        "model_args": model_args(model, patch, dtype, extra_model_args),
        "tasks": task_list,
        "batch_size": batch_size,
    }
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    if device is None:  # lm-eval's hf model otherwise warms up a CUDA allocator even on a CPU-only torch
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs["device"] = device
    if limit is not None:
        kwargs["limit"] = limit
    if seed is not None:
        kwargs.update(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
    return kwargs


def run_lm_eval(model: str = "default", patch: str | Path | None = None,
                tasks: str | Sequence[str] = ("arc_easy",), include_path: str | Path | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` and return its results dict (raises LMEvalUnavailable without lm-eval).

    `include_path`: a directory of your own lm-eval task YAMLs (e.g. a task over a local file, for offline use),
    passed to lm-eval's `TaskManager(include_path=...)`.
    """
    lm_eval = _require_lm_eval()  # first, so a missing package is reported before any model conversion
    if include_path is not None and not Path(include_path).is_dir():
        raise ModelError(f"lm-eval include_path {include_path}: not a directory of task YAML files")
    call = simple_evaluate_kwargs(model, patch, tasks, **kwargs)
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        call["task_manager"] = TaskManager(include_path=str(include_path))
    return lm_eval.simple_evaluate(**call)
