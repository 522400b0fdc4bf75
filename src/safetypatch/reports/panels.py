"""The other charts of a report: the strength dial (a calibration's refusal curve against the patch scale), refusal
per category (harmful and benign prompts, base and patched), and the geometry heatmaps (layer x module: how much
more of dW's energy lies in W0's top-k right singular subspace than a random subspace of that size would hold).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .frontier import legend, percent_axis
from .rows import RunRow, number, pct, short_model
from .svg import Chart, Hover, figure_svg, pyplot

MAX_COLUMNS = 40  # runs shown in the per-category chart
SIDE_BY_SIDE = 6  # columns up to which the harmful and benign heatmaps stand side by side
MAX_ANNOTATED = 150  # heatmap cells written out as numbers
NICE_TICKS = (0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)


def dial_chart(rows: list[RunRow]) -> Chart | None:
    """A panel per run with a calibration: harmful and benign refusal (dev) against the scale s, the benign budget
    and the chosen s. None when no run has one."""
    have = [r for r in rows if r.calibration]
    if not have:
        return None
    plt = pyplot()
    cols = min(3, len(have))
    fig, axes = plt.subplots(math.ceil(len(have) / cols), cols, figsize=(4.4 * cols, 3.4 * math.ceil(len(have) / cols)),
                             squeeze=False)
    hover = Hover("dial")
    for ax, r in zip(axes.flat, have):
        cal = r.calibration or {}
        curve = sorted((p for p in cal.get("curve", []) if isinstance(p, dict) and number(p.get("factor")) is not None),
                       key=lambda p: p["factor"])
        for key, style, label in (("harmful_refusal", "o-", "harmful refusal (dev)"),
                                  ("benign_refusal", "s-", "benign refusal (dev)")):
            pts = [(p["factor"], y) for p in curve if (y := number(p.get(key))) is not None]
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=5, label=label)
            hover.point(line, f"{r.name}: {label}\n" + "\n".join(f"s={x:g}: {pct(y)}" for x, y in pts))
        budget, base = number(cal.get("budget")), number(cal.get("base_benign_refusal"))
        if budget is not None and base is not None:
            ax.axhline(base + budget, color="grey", ls="--", lw=1, label="benign budget")
        chosen = number(cal.get("chosen_factor"))
        if chosen is not None and cal.get("within_budget", True):
            ax.axvline(chosen, color="green", ls=":", label=f"chosen s = {chosen:g}")
        ax.set(xlabel="patch scale s", ylabel="refusal rate", ylim=(-0.03, 1.03))
        percent_axis(ax.yaxis)
        ax.set_title(r.name + (f" [{r.model_label}]" if len({x.model_key for x in have}) > 1 else ""), fontsize=9)
        ax.grid(alpha=0.3)
        legend(ax, loc="center right")
    for ax in list(axes.flat)[len(have):]:
        ax.set_visible(False)
    fig.tight_layout()
    return Chart("dial", "dial", "Strength dial (calibration)", figure_svg(fig, hover),
                 "Refusal on the dev prompts as the patch is scaled by s (`safetypatch calibrate`); the dashed line "
                 "is the over-refusal budget, the dotted line the chosen s.")


def category_columns(rows: list[RunRow]) -> list[tuple[str, str, RunRow]]:
    """(label, variant, run) per column: for each base model its base (once), then each of its runs patched."""
    cols: list[tuple[str, str, RunRow]] = []
    several = len({r.model_key for r in rows}) > 1
    for key in dict.fromkeys(r.model_key for r in rows):
        mine = [r for r in rows if r.model_key == key]
        base = next((r for r in mine if any("base" in v for s in r.categories.values() for v in s.values())), None)
        if base is not None:
            cols.append(("base" + (f": {short_model(base.model)[:20]}" if several else ""), "base", base))
        cols += [(r.name, "patched", r) for r in mine]
    return cols[:MAX_COLUMNS]


def category_chart(rows: list[RunRow]) -> Chart | None:
    """Refusal per category, a heatmap per prompt set (categories x columns), annotated in percent."""
    import numpy as np

    have = [r for r in rows if r.done and r.categories]
    if not have:
        return None
    plt = pyplot()
    cols = category_columns(have)
    sets = [s for s in ("harmful", "benign") if any(s in r.categories for r in have)]
    cats = {s: sorted({c for r in have for c in r.categories.get(s, {})}) for s in sets}
    width = max(4.5, 3.0 + 0.55 * len(cols))
    if len(cols) <= SIDE_BY_SIDE:  # a few runs: the two sets side by side; more: one above the other
        fig, axes = plt.subplots(1, len(sets), figsize=(width * len(sets), 1.4 + 0.3 * max(map(len, cats.values()))),
                                 squeeze=False)
    else:
        heights = [1.4 + 0.3 * len(cats[s]) for s in sets]
        fig, axes = plt.subplots(len(sets), 1, figsize=(width, sum(heights) + 0.6), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
    for ax, s in zip(axes.flat, sets):
        grid = np.full((len(cats[s]), len(cols)), np.nan)
        for j, (_, variant, r) in enumerate(cols):
            for i, c in enumerate(cats[s]):
                grid[i, j] = r.categories.get(s, {}).get(c, {}).get(variant, np.nan)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn" if s == "harmful" else "RdYlGn_r", vmin=0, vmax=1,
                       aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
        for j in range(1, len(cols)):  # a white gap between base models
            if cols[j][2].model_key != cols[j - 1][2].model_key:
                ax.axvline(j - 0.5, color="white", lw=4)
        ax.set_xticks(range(len(cols)), [c[0] for c in cols], rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(len(cats[s])), cats[s], fontsize=7)
        ax.set_title(f"{s} prompts refused, % ({'higher' if s == 'harmful' else 'lower'} is better)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, format=lambda x, _: f"{100 * x:.0f}%")
    fig.tight_layout()
    return Chart("categories", "categories", "Refusal per category", figure_svg(fig, Hover("categories")),
                 "Share of prompts refused per category under each run's primary judge (attack 'none'); 'base' is "
                 "the unpatched model. Empty cells: the category was not measured for that run.")


def overlap_k(records: list[dict[str, Any]]) -> int | None:
    """The largest k for which every record has energy_right_k{k} and its random twin."""
    common = None
    for r in records:
        ks = {int(m.group(1)) for key in r if (m := re.fullmatch(r"energy_right_k(\d+)", key))
              and f"random_{key}" in r}
        common = ks if common is None else common & ks
    return max(common) if common else None


def overlap_ratio(record: dict[str, Any], k: int) -> float | None:
    """energy_right_k / random_energy_right_k of one record (1 = chance); None when not a positive number."""
    v, rnd = number(record.get(f"energy_right_k{k}")), number(record.get(f"random_energy_right_k{k}"))
    return v / rnd if v is not None and rnd and v > 0 and rnd > 0 else None


def geometry_grid(r: RunRow, k: int) -> tuple[list[Any], list[str], Any]:
    import numpy as np

    layers = sorted({g["layer"] for g in r.geometry}, key=lambda x: (not isinstance(x, int), str(x).zfill(6)))
    modules = sorted({str(g["module"]) for g in r.geometry})
    grid = np.full((len(layers), len(modules)), np.nan)
    for g in r.geometry:
        ratio = overlap_ratio(g, k)
        grid[layers.index(g["layer"]), modules.index(str(g["module"]))] = np.nan if ratio is None else ratio
    return layers, modules, grid


def geometry_charts(rows: list[RunRow]) -> list[Chart]:
    """A heatmap per run with geometry records, on one shared log colour scale (so runs compare)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    have = [(r, k) for r in rows if r.geometry and (k := overlap_k(r.geometry)) is not None]
    grids = [geometry_grid(r, k) for r, k in have]
    values = [v for _, _, g in grids for v in g.flat if np.isfinite(v)]
    if not values:
        return []
    lo, hi = min(values), max(values)
    lo, hi = (lo / 2, hi * 2) if lo == hi else (lo, hi)
    plt = pyplot()
    charts = []
    for n, ((r, k), (layers, modules, grid)) in enumerate(zip(have, grids)):
        fig, ax = plt.subplots(figsize=(2.2 + 1.0 * len(modules), 1.2 + 0.26 * len(layers)))
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", norm=LogNorm(lo, hi), aspect="auto")
        if grid.size <= MAX_ANNOTATED:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if v < math.sqrt(lo * hi) else "black")
        ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set(xlabel="module", ylabel="layer")
        ax.set_title(f"{r.name}: energy in W0's top-{k} right subspace / chance", fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        ticks = [t for t in NICE_TICKS if lo <= t <= hi] or [lo, hi]
        bar.set_ticks(ticks, labels=[f"{t:g}×" for t in ticks])
        bar.minorticks_off()
        fig.tight_layout()
        charts.append(Chart(f"geometry-{n}", "geometry", f"Geometry: {r.name}", figure_svg(fig, Hover(f"geo{n}")),
                            f"||dW V_{k}||² / ||dW||² over its value for a random {k}-dimensional subspace (1 = "
                            "chance; above 1: the update leans on the base weight's top directions). Log colour "
                            "scale, shared by every geometry chart of this report."))
    return charts
