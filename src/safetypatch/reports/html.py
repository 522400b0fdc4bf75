"""The report page: one self-contained HTML file (styles, charts and script inline; a Content-Security-Policy that
lets the page load nothing from anywhere), a banner when the runs come from different base models, the charts by
section, the notes on charts left out, and the table of runs with their recipes. Readable when printed.

A small inline script sets `document.body.dataset.chartsDrawn = "OK/TOTAL"` once the page has loaded: a chart
counts as drawn when its figure holds an `<svg>` with a non-empty box and something drawn in it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

from .charts import SECTIONS
from .rows import RunRow, Side, pct, recipe_line, value_label
from .svg import Chart

TABLE_SKIPS = ("kl_per_prompt", "nll_per_token", "accuracy_norm")  # utility metrics the table leaves out
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
CSS = """
:root{--fg:#1d2430;--muted:#5b6573;--line:#d8dde5;--soft:#f5f7fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
 background:#fff;margin:0 auto;max-width:1280px;padding:24px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}
.meta,.notes li,figcaption{color:var(--muted)}
.banner{border:1px solid #e39a3b;background:#fff4e5;color:#4d2c00;padding:10px 14px;border-radius:6px;margin:16px 0}
.banner ul{margin:6px 0}
nav{margin:12px 0}nav a{margin-right:14px;color:#2d5fb8}
figure.chart{margin:0 0 18px;padding:12px;border:1px solid var(--line);border-radius:8px;break-inside:avoid;
 page-break-inside:avoid}
figure.chart h3{font-size:15px;margin:0 0 8px}
figure.chart svg{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{font-size:12.5px;margin-top:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
g.point{cursor:help}g.point:hover{opacity:.6}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:var(--soft);position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.unfinished td{color:var(--muted);font-style:italic}
td .recipe{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
details pre{max-height:320px;overflow:auto;background:var(--soft);padding:8px;font-size:11px;margin:4px 0}
@media print{
 body{max-width:none;padding:0;font-size:11px}
 nav{display:none}
 th{position:static}
 .grid{display:block}
 figure.chart{border:none;padding:0}
 figure.chart svg{max-width:100%}
 .table-wrap{overflow:visible}
 details pre{max-height:none;overflow:visible}
}
"""
SCRIPT = """
(function(){
 function check(){
  var figs=document.querySelectorAll('figure.chart'),ok=0;
  figs.forEach(function(f){
   var s=f.querySelector('svg'),b=s?s.getBoundingClientRect():null;
   var drawn=!!(b&&b.width>0&&b.height>0&&s.querySelector('path,image,use'));
   f.setAttribute('data-drawn',drawn?'yes':'no');if(drawn){ok++;}
  });
  document.body.setAttribute('data-charts-drawn',ok+'/'+figs.length);
 }
 if(document.readyState==='complete'){check();}else{window.addEventListener('load',check);}
})();
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def banner(models: dict[str, str], rows: Sequence[RunRow]) -> str:
    """A warning naming the base models when the runs come from more than one, else ''."""
    if len(models) < 2:
        return ""
    items = []
    for key, label in models.items():
        n = sum(r.model_key == key for r in rows)
        ident = f"fingerprint {key[3:]}" if key.startswith("fp:") else "no fingerprint recorded"
        items.append(f"<li><b>{esc(label)}</b> ({ident}; {n} run{'s' * (n != 1)})</li>")
    return ('<div class="banner" role="alert" id="models-banner"><b>These runs come from '
            f"{len(models)} different base models:</b><ul>{''.join(items)}</ul>Their numbers are not comparable "
            "run for run: the frontier gives each model its own panel and the other charts label runs by model."
            "</div>")


def change(base: float | None, patched: float | None) -> str:
    return f"{pct(base)} &rarr; {pct(patched)}"


def side_value(side: Side | None, attr: str) -> float | None:
    return getattr(side, attr) if side is not None else None


def utility_cell(r: RunRow) -> str:
    """The utility metrics of a run, base -> patched (the secondary ones left out: TABLE_SKIPS)."""
    if r.patched is None or not r.patched.utility:
        return "-"
    base = r.base.utility if r.base else {}
    shown = [(k, v) for k, v in r.patched.utility.items() if not k.endswith(TABLE_SKIPS)] or []
    return "<br>".join(f"{esc(k)}: {esc(f'{base[k]:.3g} → ') if k in base else ''}{v:.3g}" for k, v in shown) or "-"


def table_row(r: RunRow) -> str:
    """One run as a table row (cells escaped)."""
    values = ", ".join(f"{k}={value_label(v)}" for k, v in r.values.items()) or "-"
    recipe = (f'<span class="recipe">{esc(recipe_line(r.recipe))}</span><details><summary>full recipe</summary>'
              f"<pre>{esc(json.dumps(r.recipe, indent=1, sort_keys=True, default=str))}</pre></details>"
              if r.recipe else "-")
    train = r.seconds.get("train")
    cells = [
        f"<td>{esc(r.name)}</td>", f"<td>{esc(r.sweep or r.kind)}</td>", f"<td>{esc(values)}</td>",
        f"<td>{esc(r.model_label or r.model)}</td>",
        f'<td class="num">{change(side_value(r.base, "harmful"), side_value(r.patched, "harmful"))}</td>',
        f'<td class="num">{change(side_value(r.base, "benign"), side_value(r.patched, "benign"))}</td>',
        f"<td>{utility_cell(r)}</td>", f'<td class="num">{size(r.patch_bytes)}</td>',
        f'<td class="num">{"-" if train is None else f"{train:.0f}"}</td>', f"<td>{esc(r.status)}</td>",
        f"<td>{recipe}</td>"]
    cls = "" if r.status == "done" else ' class="unfinished"'
    return f'<tr{cls} title="{esc(r.path)}">{"".join(cells)}</tr>'


def runs_table(rows: Sequence[RunRow]) -> str:
    """The table of runs: name, sweep, axis values, model, refusal base -> patched, utility, patch size, training
    seconds, status and recipe (a one-line summary, the full recipe folded)."""
    head = ["run", "sweep / kind", "values", "base model", "harmful refusal", "benign refusal", "utility", "patch",
            "train s", "status", "recipe"]
    return ('<div class="table-wrap"><table id="runs"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(table_row(r) for r in rows) + "</tbody></table></div>")


def figure(c: Chart) -> str:
    caption = f"<figcaption>{esc(c.caption)}</figcaption>" if c.caption else ""
    heading = f"<h3>{esc(c.title)}</h3>" if c.title != SECTIONS.get(c.section) else ""
    return (f'<figure class="chart" data-chart="{esc(c.name)}" id="chart-{esc(c.name)}">{heading}'
            f"{c.svg}{caption}</figure>")


def sections(charts: Sequence[Chart]) -> tuple[str, list[str]]:
    """The chart sections' HTML and their nav links."""
    body, links = [], []
    for key, title in SECTIONS.items():
        mine = [c for c in charts if c.section == key]
        if not mine:
            continue
        links.append(f'<a href="#{key}">{esc(title)}</a>')
        inner = "".join(figure(c) for c in mine)
        if key in ("dial", "geometry") and len(mine) > 1:
            inner = f'<div class="grid">{inner}</div>'
        body.append(f'<section id="{key}"><h2>{esc(title)}</h2>{inner}</section>')
    return "".join(body), links


def overview(rows: Sequence[RunRow], inputs: Sequence[str]) -> str:
    done = sum(r.done for r in rows)
    sweeps = list(dict.fromkeys(r.sweep for r in rows if r.sweep))
    parts = [f"{len(rows)} run{'s' * (len(rows) != 1)} ({done} finished)"]
    if sweeps:
        parts.append(f"sweeps: {', '.join(sweeps)}")
    parts.append("inputs: " + ", ".join(Path(p).name or p for p in inputs))
    return f'<p class="meta">{esc("; ".join(parts))}</p>'


def page(title: str, rows: Sequence[RunRow], charts: Sequence[Chart], notes: Sequence[str], models: dict[str, str],
         inputs: Sequence[str], version: str) -> str:
    """The whole HTML document."""
    body, links = sections(charts)
    links.append('<a href="#runs-section">Runs</a>')
    note_html = ("<section id=\"notes\"><h2>Not shown</h2><ul class=\"notes\">"
                 + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></section>") if notes else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{overview(rows, inputs)}</header>{banner(models, rows)}"
        f"<nav>{''.join(links)}</nav>{body}{note_html}"
        f'<section id="runs-section"><h2>Runs</h2>{runs_table(rows)}</section>'
        f'<footer class="meta"><p>Made by safetypatch {esc(version)} (`safetypatch report`). Rates are the share '
        "of prompts refused under each run's primary judge; hover a point for its recipe.</p></footer>"
        f"<script>{SCRIPT}</script></body></html>\n")
