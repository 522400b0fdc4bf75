"""Every chart of a report, in page order, and a note for each kind of chart the runs give no data for."""

from __future__ import annotations

from .ablation import DATA_RATIO_AXIS, axis_charts
from .frontier import frontier_chart
from .panels import category_chart, dial_chart, geometry_charts
from .rows import RunRow
from .svg import Chart, pyplot

STYLE = {"font.size": 8.5, "axes.titlesize": 9.5, "axes.spines.top": False, "axes.spines.right": False,
         "svg.hashsalt": "safetypatch", "figure.dpi": 100}
SECTIONS = {"frontier": "Frontier", "ablations": "Ablations", "data-ratio": "Data-ratio curve",
            "dial": "Strength dial", "categories": "Refusal per category", "geometry": "Geometry"}


def group_colours(rows: list[RunRow]) -> dict[str, str]:
    """A colour per group (sweep, or kind of run), in first-seen order."""
    from matplotlib.colors import to_hex

    palette = pyplot().get_cmap("tab10").colors
    return {g: to_hex(palette[i % 10]) for i, g in enumerate(dict.fromkeys(r.group for r in rows))}


def missing_notes(rows: list[RunRow], charts: list[Chart]) -> list[str]:
    """Why a kind of chart is absent."""
    have = {c.section for c in charts}
    notes = []
    if "frontier" not in have:
        notes.append("Frontier: no finished run has both a harmful and a benign refusal rate.")
    if "ablations" not in have and "data-ratio" not in have:
        notes.append("Ablations: no sweep among the inputs has a finished point (`safetypatch sweep`).")
    if "data-ratio" not in have:
        notes.append(f"Data-ratio curve: no sweep over the axis '{DATA_RATIO_AXIS}' among the inputs.")
    if "dial" not in have:
        notes.append("Strength dial: no run's patch has a calibration (`safetypatch calibrate --patch P`).")
    if "categories" not in have:
        notes.append("Refusal per category: no run has judged answers with categories (samples.jsonl).")
    if "geometry" not in have:
        notes.append("Geometry: no run has geometry records (a sweep point's geometry.json, from "
                     "`safetypatch analyze`).")
    return notes


def build_charts(rows: list[RunRow]) -> tuple[list[Chart], list[str]]:
    """(the charts in page order, notes on the charts left out)."""
    import matplotlib

    pyplot()
    with matplotlib.rc_context(STYLE):
        charts: list[Chart] = []
        frontier = frontier_chart(rows, group_colours(rows))
        charts += [frontier] if frontier else []
        charts += axis_charts(rows)
        charts += [c for c in (dial_chart(rows), category_chart(rows)) if c is not None]
        charts += geometry_charts(rows)
    order = list(SECTIONS)
    charts.sort(key=lambda c: order.index(c.section))
    return charts, missing_notes(rows, charts)
