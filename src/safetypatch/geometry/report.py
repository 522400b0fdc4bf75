"""What an analysis writes and prints: geometry.json / shift.json (NaN and inf as null), the overlap heatmap and
the shift plot (PNG, written atomically), and the compact text table.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

from ..io_utils import atomic_write_bytes, atomic_write_json


def _clean(x: Any) -> Any:
    """NaN / inf -> None so the JSON stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _ratio(rec: dict[str, Any], metric: str) -> float:
    v, r = rec.get(metric), rec.get(f"random_{metric}")
    return v / r if isinstance(v, (int, float)) and r and math.isfinite(v) else math.nan


def _png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_overlap(records: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Layer x module heatmap of `metric` / `random_metric` (1 = chance level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r["layer"] for r in records})
    modules = sorted({r["module"] for r in records})
    grid = np.full((len(layers), len(modules)), np.nan)
    for r in records:
        grid[layers.index(r["layer"]), modules.index(r["module"])] = _ratio(r, metric)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 1.0 + 0.35 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"{metric} / random (1 = chance)")
    fig.colorbar(im, ax=ax)
    _png(fig, path)


def plot_shift(shift: dict[str, Any], path: Path) -> None:
    """Relative hidden-state shift per layer, benign vs harmful prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in (("benign", "o-"), ("harmful", "s-")):
        ys = shift.get(name) or []
        ax.plot(range(len(ys)), ys, style, label=f"{name} (n={shift.get(f'n_{name}', 0)})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean ||h_patched - h_base|| / ||h_base||")
    ax.set_title("hidden-state shift at the last prompt token")
    ax.legend()
    _png(fig, path)


def write_outputs(out_dir: str | Path, records: list[dict[str, Any]], shift: dict[str, Any] | None,
                  ks: Sequence[int]) -> Path:
    """DIR/geometry.json, DIR/overlap_heatmap.png and, with a shift, DIR/shift.json and DIR/shift.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "geometry.json", _clean(records))
    if records:
        plot_overlap(records, out / "overlap_heatmap.png", f"energy_right_k{max(ks)}")
    if shift is not None:
        atomic_write_json(out / "shift.json", _clean(shift))
        plot_shift(shift, out / "shift.png")
    return out


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(records: list[dict[str, Any]], k: int | None = None) -> str:
    """Compact text table, one row per (layer, module); overlap columns at the largest k as value/random."""
    if not records:
        return "(no changed weights)"
    if k is None:
        ks = [int(m.group(1)) for key in records[0] if (m := re.fullmatch(r"sim_k(\d+)", key))]
        k = max(ks) if ks else 1
    head = (f"{'layer':>5} {'module':<18} {'||dW||':>9} {'rel':>8} {'srank':>6} {'erank':>6} "
            f"{f'sim@{k}':>11} {f'pa@{k}':>11} {f'Eleft@{k}':>13} {f'Eright@{k}':>13} {'intr':>5}")
    lines = [head, "-" * len(head)]
    for r in records:
        def pair(m: str, spec: str = ".2f") -> str:
            return f"{_fmt(r.get(m), spec)}/{_fmt(r.get('random_' + m), spec)}"
        lines.append(
            f"{r['layer']:>5} {r['module'][:18]:<18} {_fmt(r['fro'], '.3g'):>9} {_fmt(r['rel_fro'], '.2e'):>8} "
            f"{_fmt(r['stable_rank'], '.1f'):>6} {_fmt(r['effective_rank'], '.1f'):>6} {pair(f'sim_k{k}'):>11} "
            f"{pair(f'pa_mean_k{k}'):>11} {pair(f'energy_left_k{k}', '.3f'):>13} "
            f"{pair(f'energy_right_k{k}', '.3f'):>13} {r['intruders']:>2}/{r['random_intruders']:<2}")
    lines.append("value/random: random = same metric for a random subspace of the same size (chance level)")
    return "\n".join(lines)


def print_table(records: list[dict[str, Any]], k: int | None = None) -> None:
    """Print format_table(records)."""
    print(format_table(records, k))
