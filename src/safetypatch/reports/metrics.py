"""The numbers of a run, out of what `safetypatch demo` and `safetypatch eval --suite` write: refusal rates on
harmful and benign prompts under the primary judge (base and patched), utility metrics, and refusal per category
from the judged answers (samples.jsonl).

Suite summaries: harmful refusal is the `builtin_harmful` benchmark (else the first entry of kind 'harmful', else
the first whose name holds 'harmful' / 'unsafe' / 'advbench'), attack 'none', judge `refusal_xstest` (else the
first judge measured on it); benign refusal likewise with `builtin_benign` / kind 'benign' / 'benign' or 'safe';
utility is every metric measured without a judge ('kl_per_token', 'mmlu accuracy', 'ppl perplexity', ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .files import DAMAGED, need, optional
from .rows import Side, number

PRIMARY_JUDGE = "refusal_xstest"
HARMFUL_NAMES = ("harmful", "unsafe", "advbench")
BENIGN_NAMES = ("benign", "safe")
VARIANTS = ("base", "patched")


def demo_sides(summary: dict[str, Any], judge: str, where: Path) -> dict[str, Side]:
    """{'base': Side, 'patched': Side} from a demo summary's `results.{harmful,benign}.{base,patched}`."""
    results = need(summary, "results", dict, where)
    sides = {v: Side() for v in VARIANTS}
    for kind in ("harmful", "benign"):
        block = optional(results, kind, dict, f"{where} (results)", {})
        for variant in VARIANTS:
            got = optional(block, variant, dict, f"{where} (results.{kind})", {})
            setattr(sides[variant], kind, number(got.get(judge)))
            setattr(sides[variant], f"n_{kind}", got.get("n") if isinstance(got.get("n"), int) else None)
    return sides


def metric_index(summary: dict[str, Any], where: Path) -> dict[tuple[str, ...], tuple[float, int | None]]:
    """(variant, benchmark, attack, judge, metric) -> (value, n) from a suite summary's flat `metrics` list."""
    out = {}
    for i, m in enumerate(need(summary, "metrics", list, where)):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: metrics[{i}] is a {type(m).__name__}, expected an object; {DAMAGED}")
        value = number(m.get("value"))
        if value is None:
            continue
        key = tuple(str(m.get(k) or "") for k in ("variant", "benchmark", "attack", "judge", "metric"))
        out[key] = (value, m.get("n") if isinstance(m.get("n"), int) else None)
    return out


def pick_benchmark(benchmarks: list[str], entries: dict[str, Any], kind: str) -> str | None:
    """The benchmark a suite's harmful (`kind` 'harmful') or benign refusal is read from; None when none fits."""
    preferred = f"builtin_{kind}"
    if preferred in benchmarks:
        return preferred
    by_kind = [b for b in benchmarks if isinstance(entries.get(b), dict) and entries[b].get("kind") == kind]
    if by_kind:
        return by_kind[0]
    names = HARMFUL_NAMES if kind == "harmful" else BENIGN_NAMES
    other = HARMFUL_NAMES if kind == "benign" else ()
    hits = [b for b in benchmarks if any(n in b.lower() for n in names) and not any(n in b.lower() for n in other)]
    return hits[0] if hits else None


def utility_name(benchmark: str, metric: str, entries: dict[str, Any]) -> str:
    """A utility metric's name: the metric alone for a KL entry ('kl_per_token'), else 'mmlu accuracy'."""
    entry = entries.get(benchmark)
    kl = isinstance(entry, dict) and entry.get("type") == "kl" or metric.startswith(benchmark)
    return metric if kl else f"{benchmark} {metric}"


def suite_sides(summary: dict[str, Any], where: Path) -> tuple[dict[str, Side], str, dict[str, str | None]]:
    """({variant: Side}, the judge, {'harmful': benchmark, 'benign': benchmark}) from a suite summary. The variant
    'finetuned' stands in for 'patched' in a run without a patch."""
    index = metric_index(summary, where)
    entries = summary.get("entries") if isinstance(summary.get("entries"), dict) else {}
    benchmarks = list(dict.fromkeys(k[1] for k in index))
    chosen = {kind: pick_benchmark(benchmarks, entries, kind) for kind in ("harmful", "benign")}
    judges = [k[3] for k in index if k[1] in chosen.values() and k[2] == "none" and k[4] == "refusal_rate"]
    judge = PRIMARY_JUDGE if PRIMARY_JUDGE in judges or not judges else judges[0]
    variants = {k[0] for k in index}
    names = {"base": "base", "patched": "patched" if "patched" in variants or "finetuned" not in variants
             else "finetuned"}
    sides = {}
    for variant, name in names.items():
        if name not in variants:
            continue
        side = Side()
        for kind, bench in chosen.items():
            got = index.get((name, bench or "", "none", judge, "refusal_rate"))
            if got:
                setattr(side, kind, got[0])
                setattr(side, f"n_{kind}", got[1])
        side.utility = {utility_name(k[1], k[4], entries): v for k, (v, _) in index.items()
                        if k[0] == name and not k[3]}
        sides[variant] = side
    return sides, judge, chosen


def sample_set(row: dict[str, Any], benchmarks: dict[str, str | None] | None) -> str | None:
    """'harmful' / 'benign' for a judged answer that counts towards a refusal rate, None for the others. Demo rows
    carry `set`; suite rows count when their benchmark is the chosen one and their attack is 'none'."""
    if benchmarks is None:
        return row.get("set") if row.get("set") in ("harmful", "benign") else None
    if row.get("attack") not in (None, "", "none"):
        return None
    for kind, bench in benchmarks.items():
        if bench is not None and row.get("benchmark") == bench:
            return kind
    return None


def categories(samples: list[dict[str, Any]], judge: str,
               benchmarks: dict[str, str | None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """set -> category -> variant -> refusal rate under `judge`, from judged answers (rows without a category,
    a variant or a verdict are left out). `benchmarks`: a suite's chosen benchmarks (None: demo rows)."""
    counts: dict[tuple[str, str, str], list[int]] = {}
    for row in samples:
        kind = sample_set(row, benchmarks)
        variant = "patched" if row.get("model") == "finetuned" else row.get("model")
        verdict = row.get(judge)
        if kind is None or variant not in VARIANTS or not isinstance(verdict, bool) or not row.get("category"):
            continue
        c = counts.setdefault((kind, str(row["category"]), variant), [0, 0])
        c[0] += verdict
        c[1] += 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (kind, cat, variant), (yes, n) in sorted(counts.items()):
        out.setdefault(kind, {}).setdefault(cat, {})[variant] = yes / n
    return out
