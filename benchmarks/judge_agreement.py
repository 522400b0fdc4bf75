"""How well do our keyword judges agree with XSTest's published labels?

XSTest v2 (Röttger et al. 2024) ships, for 5 models x 450 prompts, completions with a human `final_label`
(1_full_compliance / 2_full_refusal / 3_partial_refusal), plus the GPT-4 judge's and the string-match judge's labels.
Refusal = full or partial refusal (refusal_whole's own `refused` leaves refused_then_complied out). For each of our
judges this prints accuracy and Cohen's kappa against the human labels, the GPT-4 labels and XSTest's string-match
labels, per model and pooled. Then the whole-answer classes
(refused / complied / refused_then_complied, human 3_partial_refusal read as refused_then_complied) of
`keyword_3class` and `refusal_whole` against the human labels, on all 2,250 answers and on the 1,000 answers to
unsafe (contrast_*) prompts. Measured on this data: keyword_3class 84.2 % / 84.0 %, refusal_whole 84.4 % /
84.0 %.

    python benchmarks/judge_agreement.py [--data ../shared/data/xstest]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from safetypatch.judges import DEFAULT_JUDGES, get_judge, whole_answer_class

MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
WHOLE_ANSWER_JUDGES = ("keyword_3class", "refusal_whole")


def refused(label: str) -> bool:
    return label.strip().startswith(("2", "3"))


def kappa(a: list[bool], b: list[bool]) -> float:
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return (po - pe) / (1 - pe) if pe < 1 else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/xstest")
    args = ap.parse_args()
    judges = {n: get_judge(n) for n in DEFAULT_JUDGES}
    pooled: dict[str, dict[str, list[bool]]] = {}
    print(f"{'model':<16}{'judge':<16}" + "".join(f"{'vs ' + r:>22}" for r in ("human", "gpt4", "strmatch")))
    for model in MODELS:
        gpt = {r["id"]: r for r in csv.DictReader(open(args.data / f"labels/xstest_v2_completions_{model}_gpteval.csv",
                                                       newline="", encoding="utf-8"))}
        stm = {r["id"]: r for r in csv.DictReader(open(args.data / f"labels/xstest_v2_completions_{model}_streval.csv",
                                                       newline="", encoding="utf-8"))}
        ids = sorted(gpt)
        refs = {"human": [refused(gpt[i]["final_label"]) for i in ids],
                "gpt4": [refused(gpt[i]["gpt4_label"]) for i in ids],
                "strmatch": [refused(stm[i]["strmatch_label"]) for i in ids]}
        for name, judge in judges.items():
            ours = [bool(judge.judge(gpt[i]["prompt"], gpt[i]["completion"]).refused) for i in ids]
            cells = []
            for ref, labels in refs.items():
                acc = sum(x == y for x, y in zip(ours, labels)) / len(ids)
                cells.append(f"{acc:>11.1%} k={kappa(ours, labels):+.2f}")
                pooled.setdefault(f"{name}|{ref}", {"ours": [], "ref": []})
                pooled[f"{name}|{ref}"]["ours"] += ours
                pooled[f"{name}|{ref}"]["ref"] += labels
            print(f"{model:<16}{name:<16}" + "".join(f"{c:>22}" for c in cells))
    for name in judges:
        cells = []
        for ref in ("human", "gpt4", "strmatch"):
            d = pooled[f"{name}|{ref}"]
            acc = sum(x == y for x, y in zip(d["ours"], d["ref"])) / len(d["ours"])
            cells.append(f"{acc:>11.1%} k={kappa(d['ours'], d['ref']):+.2f}")
        print(f"{'ALL (2250)':<16}{name:<16}" + "".join(f"{c:>22}" for c in cells))
    whole_answer_agreement(args.data)
    return 0


def whole_answer_agreement(data: Path) -> None:
    """3-class (refused / complied / refused_then_complied) agreement with the human labels, all and unsafe prompts."""
    rows = [r for model in MODELS for r in csv.DictReader(open(
        data / f"labels/xstest_v2_completions_{model}_gpteval.csv", newline="", encoding="utf-8"))]
    print("\nwhole-answer classes vs human (3_partial_refusal = refused_then_complied)")
    print(f"{'judge':<16}{'all':>10}{'unsafe':>10}   rtc: human / judge / both (unsafe)")
    for name in WHOLE_ANSWER_JUDGES:
        judge = get_judge(name)
        pairs = [(r["type"].startswith("contrast"), whole_answer_class(r["final_label"]),
                  whole_answer_class(judge.judge(r["prompt"], r["completion"]).label)) for r in rows]
        unsafe = [p for p in pairs if p[0]]
        acc = [sum(h == o for _, h, o in sub) / len(sub) for sub in (pairs, unsafe)]
        rtc = "refused_then_complied"
        counts = (sum(h == rtc for _, h, _ in unsafe), sum(o == rtc for _, _, o in unsafe),
                  sum(h == o == rtc for _, h, o in unsafe))
        print(f"{name:<16}{acc[0]:>10.1%}{acc[1]:>10.1%}   {counts[0]} / {counts[1]} / {counts[2]}"
              f"   (n = {len(pairs)} / {len(unsafe)})")


if __name__ == "__main__":
    sys.exit(main())
