"""What a suite run reports: patched - base differences, the nested results of summary.json, the text table."""

from __future__ import annotations

from typing import Any

from ...tables import render_table

RATE_METRICS = {"refusal_rate", "safe_rate", "full_compliance", "full_refusal", "partial_refusal",
                "refused_then_complied", "accuracy", "accuracy_norm", "exact_match"}
VALUE_WIDTH = 11  # the value columns are at least this wide


def add_differences(metrics: list[dict[str, Any]]) -> None:
    """Append a 'difference' row (patched - base) for each metric both variants have (unparseable counts excepted)."""
    base = {(m["benchmark"], m["attack"], m["judge"], m["metric"]): m for m in metrics if m["variant"] == "base"}
    for m in [m for m in metrics if m["variant"] == "patched"]:
        b = base.get((m["benchmark"], m["attack"], m["judge"], m["metric"]))
        if b is not None and b["value"] is not None and m["value"] is not None and m["metric"] != "unparseable":
            metrics.append({"variant": "difference", "benchmark": m["benchmark"], "attack": m["attack"],
                            "judge": m["judge"], "metric": m["metric"], "value": m["value"] - b["value"],
                            "n": m["n"]})


def nest(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """results[variant][benchmark][attack or '-'][judge or '-'][metric] = value."""
    out: dict[str, Any] = {}
    for m in metrics:
        d = out.setdefault(m["variant"], {}).setdefault(m["benchmark"], {})
        d = d.setdefault(m["attack"] or "-", {}).setdefault(m["judge"] or "-", {})
        d[m["metric"]] = m["value"]
    return out


def format_value(metric: str, v: float | None, diff: bool = False) -> str:
    if v is None:
        return "-"
    if metric in RATE_METRICS:
        return f"{v * 100:+.1f}pp" if diff else f"{v:.1%}"
    if metric == "unparseable":
        return f"{v:+.0f}" if diff else f"{v:.0f}"
    return f"{v:+.4g}" if diff else f"{v:.4g}"


def ordered_keys(metrics: list[dict[str, Any]]) -> tuple[list[tuple[str, str, str, str]], dict[tuple[str, ...], Any]]:
    """The (benchmark, attack, judge, metric) rows in order of first appearance of each part, and the values by
    (variant, *row)."""
    keys: list[tuple[str, str, str, str]] = []
    vals: dict[tuple[str, ...], float | None] = {}
    for m in metrics:
        k = (m["benchmark"], m["attack"], m["judge"], m["metric"])
        if k not in vals and k not in keys:
            keys.append(k)
        vals[(m["variant"], *k)] = m["value"]
    first: dict[tuple[int, str], int] = {}  # order of first appearance of each benchmark / attack / judge / metric
    for k in keys:
        for pos in range(4):
            first.setdefault((pos, k[pos]), len(first))
    keys.sort(key=lambda k: (first[(0, k[0])], first[(1, k[1])], first[(2, k[2])], first[(3, k[3])]))
    return keys, vals


def format_table(metrics: list[dict[str, Any]], columns: tuple[str, ...] = ("base", "patched", "difference"),
                 headers: tuple[str, ...] | None = None, kinds: dict[str, Any] | None = None) -> str:
    """One line per (benchmark, attack, judge, metric) with a column per variant; a safety entry's rates carry its
    kind ("refusal_rate [harmful]"), differences are in percentage points."""
    keys, vals = ordered_keys(metrics)
    present = [c for c in columns if any((c, *k) in vals for k in keys)]
    heads = [h for c, h in zip(columns, headers) if c in present] if headers else list(present)

    def metric_name(b: str, metric: str) -> str:
        kind = (kinds or {}).get(b, {}).get("kind")
        return f"{metric} [{kind}]" if kind and metric in ("refusal_rate", "safe_rate") else metric

    rows, prev = [], None
    for k in keys:
        rows.append([k[0] if k[0] != prev else "", k[1], k[2], metric_name(k[0], k[3])]
                    + [format_value(k[3], vals.get((c, *k)), diff=c in ("difference", "b-a")).rjust(VALUE_WIDTH)
                       for c in present])
        prev = k[0]
    head = ["benchmark", "attack", "judge", "metric"] + [h.rjust(VALUE_WIDTH) for h in heads]
    lines = render_table(head, rows, right=[False] * 4 + [True] * len(heads), rule=False).split("\n")
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])
