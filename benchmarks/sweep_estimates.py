"""How good are `safetypatch sweep --dry-run`'s cost estimates? Estimate against measurement, per point and stage.

Usage:
    python benchmarks/sweep_estimates.py runs/rank-quick [runs/layers-quick ...]

For every finished point of each sweep directory: the estimate `jobs/sweep_cost.py` gives for its recipe (train,
eval, geometry, and the total with model loads) next to the seconds point.json recorded, and the ratio
measured / estimated. Prints one table per sweep and the median ratio over all points (1.0 = unbiased). The
estimate's rates were set on this machine (2 CPU cores); run it where the sweep ran.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from safetypatch.config import from_dict
from safetypatch.evals.suite import load_suite
from safetypatch.jobs.sweep_cost import estimate, model_skeleton
from safetypatch.tables import render_table
from safetypatch.training.config import TrainConfig


def compare(sweep_dir: Path) -> list[float]:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    suite = load_suite(record["suite"])
    skeletons: dict[str, object] = {}
    rows, ratios = [], []
    for p in record["points"]:
        f = sweep_dir / "points" / p["name"] / "point.json"
        if not f.exists():
            continue
        measured = json.loads(f.read_text())["seconds"]
        cfg = from_dict(TrainConfig, p["recipe"], where=str(f))
        skeleton = skeletons.setdefault(cfg.model, model_skeleton(cfg.model))
        cost = estimate(cfg, skeleton, suite, record["eval"], record["geometry"])
        total = sum(measured.values())
        ratios.append(total / cost.total_s)
        rows.append([p["name"], f"{cost.train_s:.0f} / {measured.get('train', 0):.0f}",
                     f"{cost.eval_s:.0f} / {measured.get('eval', 0):.0f}",
                     f"{cost.geometry_s:.0f} / {measured.get('geometry', 0):.0f}",
                     f"{cost.total_s:.0f} / {total:.0f}", f"{total / cost.total_s:.2f}"])
    print(f"\n{sweep_dir} (estimated / measured seconds)")
    print(render_table(["point", "train", "eval", "geometry", "total", "ratio"], rows))
    return ratios


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    ratios = [r for d in argv for r in compare(Path(d))]
    if ratios:
        print(f"\n{len(ratios)} points: measured / estimated total, median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
