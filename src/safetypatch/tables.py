"""Plain-text tables for the terminal: one renderer behind every table the commands print."""

from __future__ import annotations

from typing import Sequence


def render_table(head: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None,
                 rule: bool = True, sep: str = "  ") -> str:
    """Columns as wide as their widest cell, a dashed rule under the header; `right[i]` right-aligns column i."""
    right = list(right) if right is not None else [False] * len(head)
    widths = [max([len(str(head[i]))] + [len(str(r[i])) for r in rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return sep.join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(head)]
    if rule:
        out.append(sep.join("-" * w for w in widths))
    out.extend(line(r) for r in rows)
    return "\n".join(out)
