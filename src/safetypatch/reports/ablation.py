"""One chart per sweep axis: x = the axis value (numbers on a numeric axis, log-2 when they span a factor of 8 or
more; anything else categorical, in the sweep's order), y = harmful refusal, benign refusal and a utility metric
(patched: solid; base: dashed). A series is one sweep at fixed values of its other axes. The chart of the axis
`mix_ratio` is the data-ratio curve.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

from .frontier import legend, percent_axis
from .rows import RunRow, Side, hover_text, utility_key, value_label
from .svg import Chart, Hover, figure_svg, pyplot

DATA_RATIO_AXIS = "mix_ratio"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series_of(axis: str, rows: list[RunRow]) -> dict[str, list[RunRow]]:
    """Runs by series: the sweep, the values of its other axes and, where the chart holds several, the model."""
    models = {r.model_key for r in rows}
    out: dict[str, list[RunRow]] = {}
    for r in rows:
        others = ", ".join(f"{k}={value_label(v)}" for k, v in r.values.items() if k != axis)
        label = (r.sweep or r.kind) + (f" ({others})" if others else "")
        if len(models) > 1:
            label += f" [{r.model_label}]"
        out.setdefault(label, []).append(r)
    return out


def x_axis(ax: Any, axis: str, numeric: bool, labels: list[str], xs: list[float]) -> None:
    """Ticks and scale of the x axis."""
    ax.set_xlabel(axis)
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0,
                      ha="right" if max(map(len, labels)) > 6 else "center")
        ax.set_xlim(-0.5, len(labels) - 0.5)
        return
    values = sorted(set(xs))
    if values and values[0] > 0 and values[-1] / values[0] >= 8:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    if len(values) <= 12:
        ax.set_xticks(values, [f"{v:g}" for v in values])


def draw_series(ax: Any, label: str, rows: list[RunRow], colour: str, get: Callable[[Side], float | None],
                x_of: Callable[[Any], float], axis: str, hover: Hover) -> None:
    """One series on one panel: the patched values joined by a line, the base as a dashed line."""
    pts = sorted((x_of(r.values[axis]), y, r) for r in rows
                 if r.done and (y := get(r.patched)) is not None)  # type: ignore[arg-type]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colour, lw=1.4, label=label)
    for x, y, r in pts:
        (m,) = ax.plot([x], [y], "o", color=colour, ms=6, mec="white", mew=0.6)
        hover.point(m, hover_text(r))
    base = next((b for r in rows if r.base is not None and (b := get(r.base)) is not None), None)
    if base is not None:
        ax.axhline(base, color=colour, ls="--", lw=1, alpha=0.8, label=f"base: {label}")


def axis_chart(axis: str, rows: list[RunRow]) -> Chart:
    """The chart of one axis over the sweep points that vary it."""
    plt = pyplot()
    done = [r for r in rows if r.done]
    numeric = all(is_number(r.values[axis]) for r in rows)
    labels = list(dict.fromkeys(value_label(r.values[axis]) for r in rows))
    x_of: Callable[[Any], float] = float if numeric else (lambda v: labels.index(value_label(v)))
    keys = Counter(k for r in done if (k := utility_key(r.patched)) is not None)
    panels: list[tuple[str, Callable[[Side], float | None], bool]] = [
        ("harmful refusal (higher is better)", lambda s: s.harmful, True),
        ("benign refusal (lower is better)", lambda s: s.benign, True)]
    if keys:
        ukey = keys.most_common(1)[0][0]
        panels.append((ukey + (" (lower is better)" if "kl" in ukey or "perplexity" in ukey else ""),
                       lambda s: s.utility.get(ukey), False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    hover = Hover("axis-" + re.sub(r"[^A-Za-z0-9_-]", "_", axis))
    series = series_of(axis, rows)
    colours = plt.get_cmap("tab10").colors
    for ax, (title, get, rate) in zip(axes[0], panels):
        for i, (label, srows) in enumerate(series.items()):
            draw_series(ax, label, srows, colours[i % 10], get, x_of, axis, hover)
        x_axis(ax, axis, numeric, labels, [float(r.values[axis]) for r in rows] if numeric else [])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if rate:
            ax.set_ylim(-0.03, 1.03)
            percent_axis(ax.yaxis)
    legend(axes[0][0], loc="best")
    fig.tight_layout()
    ratio = axis == DATA_RATIO_AXIS
    title = f"Data-ratio curve ({axis})" if ratio else f"Ablation: {axis}"
    caption = (f"Patched runs (solid) against {axis}; dashed lines are the base model. "
               + ("mix_ratio is the fraction of general-purpose (mix) examples in the training set. " if ratio else "")
               + "Hover a point for its recipe.")
    return Chart(hover.prefix, "data-ratio" if ratio else "ablations", title, figure_svg(fig, hover), caption)


def axis_charts(rows: list[RunRow]) -> list[Chart]:
    """A chart per axis of the sweeps among `rows` that has a finished point."""
    points = [r for r in rows if r.kind == "sweep-point"]
    charts = []
    for axis in dict.fromkeys(a for r in points for a in r.axes):
        mine = [r for r in points if axis in r.values]
        if any(r.done for r in mine):
            charts.append(axis_chart(axis, mine))
    return charts
