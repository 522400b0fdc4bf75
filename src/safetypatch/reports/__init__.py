"""Reports: one self-contained HTML page over demo runs, sweeps and suite evals (`safetypatch report`).

    rows.py      RunRow / Side: what a report knows about a run; model groups; hover texts
    files.py     JSON readers whose errors name the file, line and field
    metrics.py   refusal rates, utility and per-category refusal out of demo and suite summaries
    runs.py      input detection (demo / sweep / suite directory) and reading every run
    svg.py       matplotlib figures as inline, deterministic SVG with hover titles
    frontier.py  the safety / over-refusal / utility frontier and its Pareto front
    ablation.py  one chart per sweep axis (the data-ratio curve is the axis mix_ratio)
    panels.py    the strength dial, refusal per category, geometry heatmaps
    charts.py    every chart in page order, notes on those left out
    html.py      the page: styles, banner, sections, runs table, the chart check script

Import from here (`from ..reports import read_runs, render_report`), not from the modules. Nothing heavy at module
level: matplotlib loads when charts are drawn.
"""

from __future__ import annotations

from typing import Sequence

from .frontier import pareto_front
from .html import banner, runs_table
from .rows import RunRow, Side, assign_models
from .runs import EXPECTED, SWEEP_KIND, detect, read_runs
from .svg import Chart


def render_report(rows: list[RunRow], title: str, inputs: Sequence[str]) -> tuple[str, list[Chart]]:
    """(the HTML page over `rows`, the charts on it). `rows` come from `read_runs` (models assigned)."""
    from .. import __version__
    from .charts import build_charts
    from .html import page

    models = assign_models(rows)
    charts, notes = build_charts(rows)
    return page(title, rows, charts, notes, models, inputs, __version__), charts


__all__ = ["EXPECTED", "SWEEP_KIND", "Chart", "RunRow", "Side", "assign_models", "banner", "detect", "pareto_front",
           "read_runs", "render_report", "runs_table"]
