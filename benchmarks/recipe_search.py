"""Compare patch recipes on the embedded model: built-in test splits and public sets the patch never saw.

Usage (one variant per --variant; fields are TrainConfig's):
    python benchmarks/recipe_search.py --out runs/recipes \
        --variant r1-ce "rank=1,alpha=16,lr=1e-3" --variant r1-kl "benign_loss=kl"

For each variant: train into OUT/<name>, then greedy-generate with the patch on the built-in harmful / benign test
splits and on public sets from ../shared/data (JBB harmful and benign twins, XSTest safe and unsafe, AdvBench),
judged by both keyword judges. The base model is evaluated once and cached in OUT/base.json. Prints one table and
writes OUT/results.jsonl (one line per variant). Reads ../shared only here, never in the package.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

from safetypatch.config import GenerationConfig, from_dict
from safetypatch.training.config import TrainConfig
from safetypatch.data.builtin import builtin_split
from safetypatch.evals.refusal import generate_and_judge
from safetypatch.judges import DEFAULT_JUDGES
from safetypatch.jobs.train import train
from safetypatch.modeling import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _csv(path: Path, col: str, where: tuple[str, str] | None = None) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [r[col] for r in csv.DictReader(f) if where is None or r[where[0]] == where[1]]


def eval_sets(n_external: int, shared: Path = SHARED) -> dict[str, list[str]]:
    rng = random.Random(0)
    sample = lambda xs: xs if len(xs) <= n_external else rng.sample(xs, n_external)  # noqa: E731
    sets = {
        "builtin_harmful": [r.prompt for r in builtin_split("harmful", "test")],
        "builtin_benign": [r.prompt for r in builtin_split("benign", "test")],
    }
    if shared.exists():
        sets["jbb_harmful"] = sample(_csv(shared / "jbb/harmful-behaviors.csv", "goal"))
        sets["jbb_benign"] = sample(_csv(shared / "jbb/benign-behaviors.csv", "goal"))
        sets["xstest_safe"] = sample(_csv(shared / "xstest/xstest_prompts.csv", "prompt", ("label", "safe")))
        sets["xstest_unsafe"] = sample(_csv(shared / "xstest/xstest_prompts.csv", "prompt", ("label", "unsafe")))
        sets["advbench"] = sample(_csv(shared / "advbench/harmful_behaviors.csv", "goal"))
    return sets


def rates(model, tok, sets: dict[str, list[str]], variant: str, gen: GenerationConfig) -> dict[str, float]:
    from safetypatch.data.readers import Record

    out = {}
    for name, prompts in sets.items():
        rows = generate_and_judge(model, tok, [Record(prompt=p) for p in prompts], [variant], DEFAULT_JUDGES, gen)
        out[name] = sum(r["refusal_xstest"] for r in rows) / len(rows)
        out[name + "_gcg"] = sum(r["refusal_gcg"] for r in rows) / len(rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "FIELDS"), default=[])
    ap.add_argument("--n-external", type=int, default=50, help="prompts sampled from each public set")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default="default", help="base model for every variant (a variant's model= wins)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="directory laid out like ../shared/data")
    ap.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = eval_sets(args.n_external, args.shared)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    base_file = out / "base.json"
    model, tok = load_model(args.model)
    import torch

    if torch.cuda.is_available():
        model.to("cuda")
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        base = rates(model, tok, sets, "base", gen)
        base_file.write_text(json.dumps(base, indent=1))
    results = []
    for name, spec in args.variant:
        fields_ = {"model": args.model, **dict(kv.split("=", 1) for kv in spec.split(";" if ";" in spec else ",") if kv)}
        cfg = from_dict(TrainConfig, fields_, where=f"variant {name}")
        t0 = time.time()
        if (out / name / "train_stats.json").exists():
            print(f"{name}: already trained in {out / name}; skipped (delete it to rerun)")
            continue
        m, t = load_model(cfg.model)
        res = train(cfg, out / name, model_and_tok=(m, t))
        r = rates(res.model, t, sets, "patched", gen)
        rec = {"name": name, "fields": fields_, **r, "train_s": res.stats["train_seconds"],
               "best_step": (res.stats["best_dev"] or {}).get("step"), "steps": res.stats["steps"],
               "bytes": (res.output_dir / "adapter_model.safetensors").stat().st_size, "total_s": time.time() - t0}
        results.append(rec)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    cols = list(sets)
    print("refusal rate (XSTest string match), patched (base in the first row)")
    print("name".ljust(16) + "".join(c[:13].rjust(14) for c in cols) + "   best/steps   KB")
    print("base".ljust(16) + "".join(f"{base[c]:>14.0%}" for c in cols))
    for rec in results:
        print(rec["name"][:16].ljust(16) + "".join(f"{rec[c]:>14.0%}" for c in cols)
              + f"   {rec['best_step']}/{rec['steps']}   {rec['bytes'] / 1024:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
