"""Issue #19's targets side by side for several suite runs (quick or the dial suite): one row per run and variant.

    python benchmarks/depth_table.py runs/q-default runs/q-rec1 [--judge refusal_xstest]

Columns (all read from each run's summary.json `metrics`; '-' where the run has no such entry):
harmful (built-in, plain), wrappers (worst case over the quick suite's four wrappers), prefill k5 / k10 / k20,
prefill worst (every k <= 20 and every opening, per prompt), RTC (refused-then-complied share of the plain harmful
answers, `refusal_whole`), benign (built-in), XSTest safe, KL (per token, base || patched).
`--rejudge` recomputes the refusal columns from each run's samples.jsonl with the keyword judges as they are now
(for runs judged before a judge's rule changed); KL is always read from summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = (  # (header, benchmark, attack, judge or None for --judge, metric)
    ("harmful", "builtin_harmful", "none", None, "refusal_rate"),
    ("wrappers", "builtin_harmful_attacks", "worst_case", None, "refusal_rate"),
    ("prefill k5", "builtin_harmful_prefill", "prefill_k5", None, "refusal_rate"),
    ("k10", "builtin_harmful_prefill", "prefill_k10", None, "refusal_rate"),
    ("k20", "builtin_harmful_prefill", "prefill_k20", None, "refusal_rate"),
    ("prefill worst", "builtin_harmful_prefill", "worst_case_k20", None, "refusal_rate"),
    ("RTC", "builtin_harmful", "none", "refusal_whole", "refused_then_complied"),
    ("benign", "builtin_benign", "none", None, "refusal_rate"),
    ("XSTest safe", "xstest_safe", "none", None, "refusal_rate"),
    ("KL", "kl_builtin_benign", "", "", "kl_per_token"),
)


def cell(metrics: list[dict], variant: str, bench: str, attack: str, judge: str, metric: str) -> str:
    for m in metrics:
        if (m["variant"], m["benchmark"], m.get("attack", ""), m.get("judge", ""), m["metric"]) == \
                (variant, bench, attack, judge, metric):
            v = m["value"]
            if v is None:
                return "-"
            return f"{v:.3f}" if metric.startswith("kl") else f"{v:.0%}"
    return "-"


def rejudged(run: Path, metrics: list[dict]) -> list[dict]:
    """`metrics` with the keyword judges' refusal rates (and refused_then_complied) recomputed from samples.jsonl,
    per benchmark, attack and variant, plus the worst cases per prompt the suite entries report."""
    from safetypatch.judges import get_judge

    judges = {n: get_judge(n) for n in ("refusal_xstest", "refusal_gcg", "refusal_whole")}
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for line in (run / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        verdicts = {n: j.judge(r.get("request") or r["prompt"], r["response"]) for n, j in judges.items()}
        cells[(r["model"], r["benchmark"], r.get("attack", "none"))][r["index"]] = verdicts
    out = [m for m in metrics if m.get("judge") not in judges]
    for (variant, bench, attack), by_index in cells.items():
        for name in judges:
            vs = [v[name] for v in by_index.values()]
            out.append({"variant": variant, "benchmark": bench, "attack": attack, "judge": name,
                        "metric": "refusal_rate", "value": sum(bool(v.refused) for v in vs) / len(vs)})
            out.append({"variant": variant, "benchmark": bench, "attack": attack, "judge": name,
                        "metric": "refused_then_complied",
                        "value": sum(v.label == "refused_then_complied" for v in vs) / len(vs)})
    worst = {"builtin_harmful_attacks": ("worst_case", lambda a: True),
             "builtin_harmful_prefill": ("worst_case_k20", lambda a: a.startswith("opening_")
                                         or int(a[len("prefill_k"):]) <= 20)}
    for bench, (label, keep) in worst.items():
        for variant in ("base", "patched"):
            attacks = [(a, c) for (v, b, a), c in cells.items() if v == variant and b == bench and keep(a)]
            if not attacks:
                continue
            shared = set.intersection(*(set(c) for _, c in attacks))
            for name in judges:
                ok = [all(c[i][name].refused for _, c in attacks) for i in shared]
                out.append({"variant": variant, "benchmark": bench, "attack": label, "judge": name,
                            "metric": "refusal_rate", "value": sum(ok) / len(ok) if ok else None})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="suite output directories (each holding summary.json)")
    ap.add_argument("--judge", default="refusal_xstest", help="judge of the refusal columns (default refusal_xstest)")
    ap.add_argument("--rejudge", action="store_true", help="recompute the keyword judges' verdicts from samples.jsonl")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            print(f"error: {path} not found: give output directories of `safetypatch eval --suite`", file=sys.stderr)
            return 2
        metrics = json.loads(path.read_text())["metrics"]
        if args.rejudge:
            metrics = rejudged(Path(run), metrics)
        for variant in ("base", "patched"):
            rows.append([Path(run).name, variant] + [cell(metrics, variant, b, a, args.judge if j is None else j, m)
                                                     for _, b, a, j, m in COLUMNS])
    head = ["run", "variant"] + [c[0] for c in COLUMNS]
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print(f"(refusal by {args.judge}; RTC by refusal_whole)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
