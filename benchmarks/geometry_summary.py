"""Summarise `safetypatch analyze --out DIR` results side by side: one row per analysed update (a patch or a fully
fine-tuned model), averaged over the weights it changed, each overlap next to its random-subspace value.

    python benchmarks/geometry_summary.py runs/geo/an-default runs/geo/an-r1 runs/geo/an-full --module mlp.up_proj

Columns: number of weights, mean relative norm ||dW||_F / ||W0||_F, mean stable rank and effective rank, and for
k (default 32): left / right projection energy of dW onto W0's top-k singular subspace (random: k / d), Sim (paper
A's max |V_dW^T V_W0| over the top singular vectors), the mean principal-angle cosine and the mean number of intruder
dimensions, as "value (random)". A second table gives the hidden-state shift (from shift.json) averaged over
layers and at the last layer, benign versus harmful prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean


def summarise(rows: list[dict], k: int) -> dict[str, float]:
    def m(key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return mean(vals) if vals else float("nan")

    out = {"n": len(rows), "rel_fro": m("rel_fro"), "stable_rank": m("stable_rank"), "spectral": m("spectral"),
           "effective_rank": m("effective_rank"), "intruders": m("intruders"),
           "random_intruders": m("random_intruders")}
    for key in ("energy_left", "energy_right", "sim", "pa_mean"):
        out[key] = m(f"{key}_k{k}")
        out[f"random_{key}"] = m(f"random_{key}_k{k}")
    return out


def load_rows(d: Path, module: str | None) -> list[dict] | None:
    """geometry.json of an analyze output dir (None if missing), only weights whose module ends with `module`."""
    path = d / "geometry.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())
    return [r for r in rows if not module or str(r.get("module", "")).endswith(module)]


def load_shift(d: Path) -> dict | None:
    """shift.json of an analyze output dir, if it has both curves."""
    path = d / "shift.json"
    sh = json.loads(path.read_text()) if path.exists() else {}
    return sh if sh.get("benign") and sh.get("harmful") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="output directories of `safetypatch analyze --out`")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--module", default=None, help="only weights whose module name ends with this")
    ap.add_argument("--plot", type=Path, default=None,
                    help="write a PNG: overlap energy vs chance per update, and the hidden-state shift curves")
    args = ap.parse_args(argv)
    head = (f"{'update':<18} {'weights':>7} {'rel norm':>9} {'stable rk':>9} {'eff rk':>6}   {'E_left@k (rand)':>17} "
            f"{'E_right@k (rand)':>17} {'Sim@k (rand)':>14} {'cos PA (rand)':>14} {'intruders (rand)':>16}")
    print(f"k = {args.k}" + (f", module *{args.module}" if args.module else ""))
    print(head)
    print("-" * len(head))
    for d in args.dirs:
        rows = load_rows(d, args.module)
        if rows is None:
            print(f"{d.name:<18} missing {d / 'geometry.json'}")
            continue
        s = summarise(rows, args.k)
        print(f"{d.name:<18} {s['n']:>7} {s['rel_fro']:>9.3g} {s['stable_rank']:>9.2f} {s['effective_rank']:>6.1f}   "
              f"{s['energy_left']:>8.3f} ({s['random_energy_left']:.3f}) {s['energy_right']:>8.3f} "
              f"({s['random_energy_right']:.3f}) {s['sim']:>5.2f} ({s['random_sim']:.2f}) "
              f"{s['pa_mean']:>6.2f} ({s['random_pa_mean']:.2f}) {s['intruders']:>9.2f} ({s['random_intruders']:.2f})")
    print()
    print("hidden-state shift ||h_updated - h_base|| / ||h_base|| at the last prompt token")
    print(f"{'update':<18} {'benign (mean)':>13} {'harmful (mean)':>14} {'benign (last)':>13} {'harmful (last)':>14} "
          f"{'harmful / benign':>16}")
    for d in args.dirs:
        sh = load_shift(d)
        if sh is None:
            continue
        b, h = sh["benign"], sh["harmful"]
        ratio = mean(h) / mean(b) if mean(b) else float("nan")
        print(f"{d.name:<18} {mean(b):>13.4f} {mean(h):>14.4f} {b[-1]:>13.4f} {h[-1]:>14.4f} {ratio:>16.2f}")
    if args.plot:
        plot(args.dirs, args.k, args.module, args.plot)
        print(f"plot: {args.plot}")
    return 0


def plot(dirs: list[Path], k: int, module: str | None, path: Path) -> None:
    """Left: right / left projection energy at k divided by its random value, per update. Right: shift curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, right, left = [], [], []
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
    for d in dirs:
        name = d.name.removeprefix("an-")
        rows = load_rows(d, module)
        if rows is not None:
            s = summarise(rows, k)
            names.append(name)
            right.append(s["energy_right"] / s["random_energy_right"])
            left.append(s["energy_left"] / s["random_energy_left"])
        curves = load_shift(d)
        if curves is not None:
            line, = ax1.plot(curves["harmful"], "-", label=f"{name} harmful")
            ax1.plot(curves["benign"], "--", color=line.get_color(), label=f"{name} benign")
    x = range(len(names))
    ax0.bar([i - 0.2 for i in x], right, 0.4, label="right (input side)")
    ax0.bar([i + 0.2 for i in x], left, 0.4, label="left (output side)")
    ax0.axhline(1.0, color="k", lw=1, ls=":")
    ax0.set_xticks(list(x), names, rotation=30)
    ax0.set_ylabel(f"energy in W0's top-{k} subspace / random")
    ax0.set_title("overlap with the base weights (1 = chance)" + (f", *{module}" if module else ""))
    ax0.legend()
    ax1.set_xlabel("layer")
    ax1.set_ylabel("||h_updated - h_base|| / ||h_base||")
    ax1.set_title("hidden-state shift, last prompt token (solid harmful, dashed benign)")
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
