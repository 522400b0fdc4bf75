"""The report job (`safetypatch report`): one self-contained HTML page over demo runs, sweeps and suite evals.

    safetypatch report RUN_OR_SWEEP [RUN_OR_SWEEP ...] -o report.html [--title T] [--overwrite]

Every input is read (and any bad one named, `reports.read_runs`) before anything is written; the page is written
like every file output (`io_utils.staged_file`: complete or absent, an existing file kept unless `--overwrite`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check_config


@dataclass(kw_only=True)
class ReportConfig:
    inputs: list[str] = field(metadata={
        "positional": True, "nargs": "+", "metavar": "RUN_OR_SWEEP",
        "help": "demo run directories (`safetypatch demo --out`), sweep directories (`safetypatch sweep`) and "
                "suite eval directories (`safetypatch eval --suite ... --out`)"})
    output: str = field(metadata={"flags": ("-o", "--output"), "required": True,
                                  "help": "the HTML file to write (self-contained: open it in any browser)"})
    title: str | None = field(default=None, metadata={"help": "the page title (default: from the inputs)"})
    figures: str | None = field(default=None, metadata={
        "help": "also write every chart as a standalone SVG file into this directory (for docs and papers)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file (and --figures)"})


def default_title(inputs: list[str]) -> str:
    names = [Path(p).resolve().name or p for p in inputs]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"safetypatch report: {shown}"


SVG_NS = "http://www.w3.org/2000/svg"


def write_figures(charts: list[Any], out: Path, overwrite: bool) -> None:
    """Each chart as DIR/<name>.svg (a standalone SVG document), the directory written whole (`staged_dir`)."""
    import re

    from ..io_utils import staged_dir

    with staged_dir(out, overwrite) as tmp:
        for c in charts:
            svg = c.svg if "xmlns=" in c.svg[:400] else c.svg.replace("<svg ", f'<svg xmlns="{SVG_NS}" ', 1)
            name = re.sub(r"[^A-Za-z0-9._-]", "-", c.name)
            (tmp / f"{name}.svg").write_text('<?xml version="1.0" encoding="utf-8"?>\n' + svg, encoding="utf-8")


def run_report(cfg: ReportConfig) -> str:
    """Read every input, draw the page, write it to `cfg.output`; returns what was written."""
    from ..io_utils import check_output, staged_file
    from ..reports import read_runs, render_report

    check_config(cfg, "report")
    check_output(Path(cfg.output), cfg.overwrite, "file")  # a taken output fails before any input is read
    rows = read_runs(cfg.inputs)
    if cfg.figures:
        check_output(Path(cfg.figures), cfg.overwrite, "dir")
    text, charts = render_report(rows, cfg.title or default_title(cfg.inputs), cfg.inputs)
    with staged_file(cfg.output, cfg.overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    if cfg.figures:
        write_figures(charts, Path(cfg.figures), cfg.overwrite)
    n_charts = len(charts)
    done = sum(r.done for r in rows)
    models = len({r.model_key for r in rows})
    return (f"wrote {cfg.output}: {len(rows)} run{'s' * (len(rows) != 1)} ({done} finished), {n_charts} chart"
            f"{'s' * (n_charts != 1)}" + (f", {models} different base models (see the banner)" if models > 1 else ""))
