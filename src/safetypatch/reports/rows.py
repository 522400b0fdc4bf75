"""What a report knows about one run: `RunRow` (a demo run, a sweep point or a suite eval), its base and patched
numbers (`Side`), and the small helpers every chart and the table share: the model groups a report keeps apart,
the primary utility metric, the text shown on hover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# recipe fields a hover text names (the full recipe is in the runs table)
RECIPE_KEYS = ("method", "rank", "alpha", "target_modules", "layers", "init", "freeze_a", "mix_ratio", "lr",
               "epochs", "benign_weight", "decision_weight", "overlap_beta", "seed")
KL = "kl_per_token"


@dataclass
class Side:
    """The numbers of one variant (base or patched): refusal rates under the primary judge, with their counts,
    and utility metrics by name ('kl_per_token', 'mmlu accuracy', 'ppl perplexity', ...)."""

    harmful: float | None = None
    benign: float | None = None
    n_harmful: int | None = None
    n_benign: int | None = None
    utility: dict[str, float] = field(default_factory=dict)


@dataclass
class RunRow:
    """One run of a report. `kind`: 'demo' | 'sweep-point' | 'suite'; `status`: 'done', 'not finished' or what a
    sweep point recorded. `categories`: set ('harmful' | 'benign') -> category -> variant -> refusal rate.
    `model_key` / `model_label` are filled by `assign_models` once every run is read."""

    name: str
    kind: str
    path: str
    model: str = "?"
    fingerprint: str | None = None
    architecture: str | None = None
    sweep: str | None = None
    axes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    base: Side | None = None
    patched: Side | None = None
    judge: str = "refusal_xstest"
    categories: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    geometry: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    patch_bytes: int | None = None
    status: str = "done"
    model_key: str = ""
    model_label: str = ""

    @property
    def done(self) -> bool:
        return self.status == "done" and self.patched is not None

    @property
    def group(self) -> str:
        """What a chart colours by: the sweep, else the kind of run."""
        return self.sweep or self.kind


def number(x: Any) -> float | None:
    """`x` as a finite float, None for anything else (missing, NaN, a string, a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def utility_key(side: Side | None) -> str | None:
    """The utility metric a chart shows: KL per token, else an MMLU accuracy, else any accuracy, else the first."""
    if side is None or not side.utility:
        return None
    keys = list(side.utility)
    for test in (lambda k: k.endswith(KL), lambda k: k.startswith("mmlu") and k.endswith("accuracy"),
                 lambda k: k.endswith("accuracy")):
        hit = [k for k in keys if test(k)]
        if hit:
            return hit[0]
    return keys[0]


def kl_of(side: Side | None) -> float | None:
    """KL(base || patched) per token of a side, when measured."""
    if side is None:
        return None
    hits = [v for k, v in side.utility.items() if k.endswith(KL)]
    return hits[0] if hits else None


def value_label(v: Any) -> str:
    """An axis value as a short label: lists joined with '+', numbers with %g."""
    if isinstance(v, (list, tuple)):
        return "+".join(value_label(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def recipe_line(recipe: dict[str, Any]) -> str:
    """The recipe fields that tell runs apart, as 'rank=4 alpha=64 ...'."""
    return " ".join(f"{k}={value_label(recipe[k])}" for k in RECIPE_KEYS if k in recipe and recipe[k] is not None)


def hover_text(row: RunRow) -> str:
    """What hovering a run's point shows: its name, model, axis values, numbers and recipe."""
    lines = [f"{row.name} ({row.sweep or row.kind})", f"model: {row.model_label or row.model}"]
    if row.values:
        lines.append("values: " + ", ".join(f"{k}={value_label(v)}" for k, v in row.values.items()))
    for name, get in (("harmful refusal", lambda s: s.harmful), ("benign refusal", lambda s: s.benign)):
        base = get(row.base) if row.base else None
        patched = get(row.patched) if row.patched else None
        lines.append(f"{name}: {pct(base)} -> {pct(patched)}")
    if row.patched and row.patched.utility:
        lines.append("utility: " + ", ".join(f"{k} {v:.4g}" for k, v in row.patched.utility.items()))
    if row.recipe:
        lines.append("recipe: " + recipe_line(row.recipe))
    return "\n".join(lines)


def short_model(spec: str) -> str:
    """A model spec short enough for a legend: a long path keeps its last two parts."""
    parts = spec.rstrip("/").split("/")
    return spec if len(spec) <= 32 or len(parts) <= 2 else ".../" + "/".join(parts[-2:])


def assign_models(rows: list[RunRow]) -> dict[str, str]:
    """Give every run its `model_key` (the base-model fingerprint id where known; a run without one joins the
    fingerprint of the runs with its model spec when that is unambiguous, else its spec) and `model_label`.
    Returns {key: label} in first-seen order."""
    by_spec: dict[str, set[str]] = {}
    for r in rows:
        if r.fingerprint:
            by_spec.setdefault(r.model, set()).add(r.fingerprint)
    arch: dict[str, str] = {}
    for r in rows:
        known = by_spec.get(r.model, set())
        r.model_key = (f"fp:{r.fingerprint}" if r.fingerprint
                       else f"fp:{next(iter(known))}" if len(known) == 1 else f"spec:{r.model}")
        if r.architecture:
            arch.setdefault(r.model_key, r.architecture)
    specs: dict[str, list[str]] = {}
    for r in rows:
        specs.setdefault(r.model_key, [])
        if r.model not in specs[r.model_key]:
            specs[r.model_key].append(r.model)
    labels: dict[str, str] = {}
    for key, names in specs.items():
        label = " / ".join(short_model(n) for n in names)
        if key in arch:
            label += f" ({arch[key]})"
        labels[key] = label
    clash = [k for k in labels if list(labels.values()).count(labels[k]) > 1]
    for k in clash:  # one spec, two fingerprints: the fingerprint tells them apart
        labels[k] += f" [{k[3:11] if k.startswith('fp:') else 'no fingerprint'}]"
    for r in rows:
        r.model_label = labels[r.model_key]
    return labels
