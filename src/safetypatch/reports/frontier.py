"""The safety / over-refusal / utility frontier: one point per run (patched), the base model marked, the Pareto
front drawn as a step line; one row of panels per base model, so runs of different models never share a panel.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .rows import RunRow, Side, hover_text, kl_of, pct
from .svg import Chart, Hover, figure_svg, pyplot

LABEL_LIMIT = 15  # points named on the chart itself (more: hover only)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (x no larger and y no smaller, one of the two strictly): the
    best trade-offs when x is to be small (over-refusal, KL) and y large (harmful refusal). Sorted by x, then y."""
    keep = []
    for i, (x, y) in enumerate(points):
        beaten = any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not beaten:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


def legend(ax: Any, **kw: Any) -> None:
    """A legend with each label once."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(list(unique.values()), list(unique.keys()), fontsize=7, **kw)


def percent_axis(axis: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(1.0))


def panel(ax: Any, rows: list[RunRow], get: Callable[[Side], float | None], what: str,
          colours: dict[str, str], hover: Hover, others: list[RunRow]) -> None:
    """One frontier panel: x = get(side), y = harmful refusal; the base model as measured in `rows` and in
    `others` (runs of the same model without a patched side)."""
    pts = [(x, r.patched.harmful, r) for r in rows
           if r.patched is not None and r.patched.harmful is not None and (x := get(r.patched)) is not None]
    names: dict[tuple[float, float], list[str]] = {}
    for x, y, r in pts:
        (line,) = ax.plot([x], [y], "o", ms=7, color=colours[r.group], mec="white", mew=0.6, label=r.group, zorder=3)
        hover.point(line, hover_text(r))
        names.setdefault((x, y), []).append(r.name)
    if len(pts) <= LABEL_LIMIT:  # runs on one spot share one label
        for (x, y), here in names.items():
            ax.annotate(", ".join(here), (x, y), xytext=(5, -10), textcoords="offset points", fontsize=7,
                        color="0.25")
    bases: dict[tuple[float, float], RunRow] = {}
    for r in rows + others:
        if r.base is not None and r.base.harmful is not None and (x := get(r.base)) is not None:
            bases.setdefault((round(x, 9), round(r.base.harmful, 9)), r)
    for (x, y), r in bases.items():
        (line,) = ax.plot([x], [y], "*", ms=14, color="black", mec="white", mew=0.6, label="base model", zorder=2.5)
        hover.point(line, f"base model: {r.model_label}, as measured in {r.name}\nharmful refusal: {pct(y)}\n"
                          f"{what}: {x:.4g}")
    if not pts and not bases:
        ax.text(0.5, 0.5, f"not measured for these runs:\n{what}", transform=ax.transAxes, ha="center",
                va="center", color="0.4")
        ax.set_xticks([])
    front = pareto_front([(x, y) for x, y, _ in pts])
    if front:
        ax.plot([pts[k][0] for k in front], [pts[k][1] for k in front], drawstyle="steps-post", color="0.35",
                lw=1.2, zorder=2, label="Pareto front")
    ax.set_ylim(-0.03, 1.03)
    percent_axis(ax.yaxis)
    ax.set_ylabel("harmful refusal (higher is better)")
    ax.grid(alpha=0.3)
    legend(ax, loc="lower right")


def frontier_chart(rows: list[RunRow], colours: dict[str, str]) -> Chart | None:
    """The frontier of every finished run with both refusal rates; None when there is none. A second panel puts
    KL(base || patched) per token on x when any run measured it."""
    done = [r for r in rows if r.done and r.patched.harmful is not None and r.patched.benign is not None]
    if not done:
        return None
    plt = pyplot()
    models = list(dict.fromkeys(r.model_key for r in done))
    panels: list[tuple[str, Callable[[Side], float | None]]] = [
        ("benign refusal (over-refusal, lower is better)", lambda s: s.benign)]
    if any(kl_of(r.patched) is not None for r in done):
        panels.append(("KL(base || patched) per token (lower is better)", kl_of))
    # a row per model with both panels; with one panel, the models side by side (two to a row)
    per_row = len(panels) if len(panels) > 1 else min(2, len(models))
    n_rows = math.ceil(len(models) * len(panels) / per_row)
    fig, grid = plt.subplots(n_rows, per_row, figsize=(6.2 * per_row, 4.4 * n_rows), squeeze=False)
    for extra in list(grid.flat)[len(models) * len(panels):]:
        extra.set_visible(False)
    hover = Hover("frontier")
    for i, key in enumerate(models):
        mine = [r for r in done if r.model_key == key]
        others = [r for r in rows if r.model_key == key and not r.done]
        for j, (what, get) in enumerate(panels):
            ax = grid.flat[i * len(panels) + j]
            panel(ax, mine, get, what, colours, hover, others)
            ax.set_xlabel(what)
            if j == 0:  # rates: from 0, wide enough to show every point, at most 100 %
                widest = max([r.patched.benign for r in mine] + [r.base.benign for r in mine
                                                                   if r.base and r.base.benign is not None])
                ax.set_xlim(-0.01, min(1.02, max(0.2, 1.25 * widest)))
                percent_axis(ax.xaxis)
            ax.set_title(("safety vs over-refusal" if j == 0 else "safety vs utility")
                         + (f": {mine[0].model_label}" if len(models) > 1 else ""), fontsize=10)
    fig.tight_layout()
    caption = ("One point per run (patched model), the black star is the base model, the grey step line is the "
               "Pareto front (no other run refuses more harmful prompts with less over-refusal"
               + (" or less KL" if len(panels) > 1 else "") + "). Hover a point for its recipe."
               + (" Each base model has its own panel." if len(models) > 1 else ""))
    return Chart("frontier", "frontier", "Safety / over-refusal / utility frontier", figure_svg(fig, hover), caption)
