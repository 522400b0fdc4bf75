"""matplotlib figures as inline SVG for an HTML page: drawn off-screen (Agg), deterministic (a fixed hash salt,
no date), every id prefixed with the chart's name so many charts share one page, and a `<title>` (the browser's
hover text) added to each artist given a gid with `point(...)`.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chart:
    """One chart of a report: `name` (unique on the page: `data-chart`), the section it belongs to, a title, the
    inline `<svg>` and a caption saying how to read it."""

    name: str
    section: str
    title: str
    svg: str
    caption: str = ""


@dataclass
class Hover:
    """The hover texts of one figure: gid -> text (`point` gives each artist its gid)."""

    prefix: str
    texts: dict[str, str] = field(default_factory=dict)

    def point(self, artist: Any, text: str) -> Any:
        gid = f"pt{len(self.texts)}"
        artist.set_gid(gid)
        self.texts[gid] = text
        return artist


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_svg(fig: Any, hover: Hover) -> str:
    """`fig` as an `<svg>` element for inline use (the figure is closed)."""
    import matplotlib

    plt = pyplot()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": hover.prefix, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    for gid, title in hover.texts.items():
        text = text.replace(f'<g id="{gid}">', f'<g id="{gid}" class="point"><title>{html.escape(title)}</title>', 1)
    p = hover.prefix
    text = re.sub(r'\bid="([^"]+)"', rf'id="{p}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{p}-\1)", text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{p}-\1"', text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(p)}" ', 1)
