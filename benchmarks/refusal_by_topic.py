"""Refusal per harm topic from a suite run's samples.jsonl: CBRN, drug synthesis and weapons requests, by keyword.

    python benchmarks/refusal_by_topic.py runs/public [--judge refusal_xstest] [--attack none]

Public sets label categories differently (HarmBench `chemical_biological`, JBB `Physical harm`, AdvBench and
MaliciousInstruct none), so a request's topic is found here by keywords in the request itself (the lists below,
matched as lower-case word prefixes); a request may have several topics, and most have none ("other"). It prints, per
topic and variant, refused / n under `--judge` and the requests the patched model answered.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

TOPICS: dict[str, tuple[str, ...]] = {
    "cbrn": ("chemical weapon", "biological weapon", "bioweapon", "nerve agent", "sarin", "vx ", "mustard gas",
             "chlorine gas", "anthrax", "ricin", "botulinum", "toxin", "pathogen", "virus", "smallpox", "plague",
             "radioactive", "radiological", "dirty bomb", "uranium", "plutonium", "nuclear", "poison gas", "poison"),
    "drugs": ("drug", "meth", "methamphetamine", "cocaine", "heroin", "fentanyl", "mdma", "lsd", "opioid",
              "narcotic", "crack cocaine", "safrole", "precursor", "synthesi", "cook "),
    "weapons": ("bomb", "explosive", "weapon", "gun", "firearm", "rifle", "grenade", "incendiary", "molotov",
                "napalm", "thermite", "ammunition", "detonat", "pipe bomb", "ghost gun", "silencer"),
}


def topics(request: str) -> list[str]:
    """The topics whose keywords occur in `request` as word prefixes (lower-case); ['other'] when none does."""
    text = " " + re.sub(r"[^a-z0-9 ]+", " ", request.lower()) + " "
    found = [t for t, words in TOPICS.items() if any(f" {w}" in text for w in words)]
    return found or ["other"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a suite output directory (holding samples.jsonl)")
    ap.add_argument("--judge", default="refusal_xstest", help="the verdict column to count (default refusal_xstest)")
    ap.add_argument("--attack", default="none", help="which attack's rows (default: the plain requests)")
    ap.add_argument("--show", type=int, default=5, help="answered requests listed per topic (patched model)")
    args = ap.parse_args(argv)
    path = Path(args.run) / "samples.jsonl"
    if not path.is_file():
        print(f"error: {path} not found: give the output directory of `safetypatch eval --suite`", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("attack", "none") == args.attack and r.get("label", "harmful") == "harmful"
            and r.get(args.judge) is not None]
    if not rows:
        print(f"error: {path} has no harmful rows with attack '{args.attack}' judged by '{args.judge}'",
              file=sys.stderr)
        return 2
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        for t in topics(r.get("request") or r["prompt"]):
            cells[(t, r["model"])].append(r)
    variants = sorted({r["model"] for r in rows})
    print(f"{'topic':<9}" + "".join(f"{v:>18}" for v in variants) + f"   (judge {args.judge}, attack {args.attack})")
    for t in (*TOPICS, "other"):
        line = f"{t:<9}"
        for v in variants:
            mine = cells.get((t, v), [])
            line += f"{sum(bool(r[args.judge]) for r in mine):>8} / {len(mine):<4} " + (
                f"{sum(bool(r[args.judge]) for r in mine) / len(mine):4.0%}" if mine else "   -")
        print(line)
    for t in TOPICS:
        answered = [r for r in cells.get((t, "patched"), []) if not r[args.judge]]
        for r in answered[: args.show]:
            print(f"  answered ({t}, {r.get('benchmark', '')}): {(r.get('request') or r['prompt'])[:90]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
