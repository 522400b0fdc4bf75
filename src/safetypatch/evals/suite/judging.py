"""Which judges a suite run can use, and judging generated answers.

A model-based judge is used only with a model given for it (`--judge-model NAME=MODEL`, or `--judge-model MODEL`
for all): never a silent download of its default model.
"""

from __future__ import annotations

import inspect
from typing import Any

from ...judges import JUDGES, Judge, get_judge

MODEL_PARAMS = ("model", "model_id", "model_name", "judge_model")  # constructor argument naming a judge's model
# Harm classifiers' `refused` means "the response was judged not harmful" (the attack failed): their rate is reported
# as safe_rate (1 - attack success rate), not as a refusal rate.
SAFE_RATE_JUDGES = ("llamaguard", "harmbench_cls")
THREE_CLASS_MODEL_JUDGE = "xstest_3class"
THREE_CLASS_KEYWORD_JUDGE = "keyword_3class"


def usable_judge(name: str, judge_models: dict[str, str], device: str | None = None
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """(constructor kwargs, None) when judge `name` can be used, else (None, why not)."""
    if name not in JUDGES:
        return None, f"judge '{name}' is not installed (available: {', '.join(sorted(JUDGES))})"
    model_param, params = None, {}
    for klass in JUDGES[name].__mro__:  # a subclass may take (*args, **kwargs) and pass `model` on
        init = klass.__dict__.get("__init__")
        if init is not None:
            params = dict(inspect.signature(init).parameters)
            model_param = next((p for p in MODEL_PARAMS if p in params), None)
            if model_param:
                break
    if model_param is None:
        return {}, None
    spec = judge_models.get(name) or judge_models.get("*")
    if not spec:
        return None, f"judge '{name}' needs a judge model: give --judge-model {name}=MODEL"
    return {model_param: spec, **({"device": device} if device and "device" in params else {})}, None


def build_judges(names: list[str], judge_models: dict[str, str], device: str | None = None) -> dict[str, Judge]:
    """One judge object per name (a model judge loads its model here)."""
    out: dict[str, Judge] = {}
    for j in names:
        if j not in out:
            kwargs, _ = usable_judge(j, judge_models, device)
            out[j] = get_judge(j, **(kwargs or {}))
    return out


def judge_rows(name: str, judge: Judge, requests: list[str], rows: list[dict[str, Any]], with_label: bool) -> None:
    """Judge each row's response against its original request; store the verdict (None: unparseable) under `name`,
    and its label (`with_label`) and score when it has one."""
    verdicts = judge.judge_many(requests, [row["response"] for row in rows])
    for row, vd in zip(rows, verdicts):
        row[name] = vd.refused if vd.parsed else None
        if with_label:
            row[f"{name}_label"] = vd.label
        score = getattr(vd, "score", None)
        if score is not None:
            row[f"{name}_score"] = score
