"""Red-teaming rounds (paper A's lifelong patching): find what the patched model still answers, patch that, stack.

Round r:
1. the current stack (the first patch plus every earlier round's patch, combined exactly by `stack_patches`) is
   attached to the base model;
2. every pool prompt of the red-team half, plain and wrapped by each attack, is generated and judged
   (`keyword_refusal`); answered ones are the failures (at most `per_round`, spread over attacks);
3. each failure becomes a refusal example (the pool record's own response, else one of the built-in refusals);
4. a new patch is trained on them with the current stack merged into the weights (so earlier patches are frozen)
   and benign anchors answered by that model, and recorded as a patch for the true base model;
5. the stack grows by the new patch, and is evaluated on the held-out half of the pool (plain, and worst case over
   attacks) and on benign dev prompts (over-refusal).
Every round's directory keeps its failures, patch, stack and numbers (`round.json`); a rerun skips finished rounds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GenerationConfig, TrainConfig
from .data.readers import Record
from .io_utils import atomic_write_json

DEFAULT_ATTACKS = ("none", "prefix_injection", "refusal_suppression", "aim")


@dataclass
class RedteamConfig:
    rounds: int = field(default=3, metadata={"help": "red-teaming rounds"})
    attacks: tuple[str, ...] = field(default=DEFAULT_ATTACKS, metadata={"help": "attack names ('none' = plain)"})
    per_round: int = field(default=24, metadata={"help": "failures turned into training examples per round"})
    holdout_every: int = field(default=3, metadata={"help": "every k-th pool prompt is held out for evaluation"})
    benign_dev: str = field(default="builtin:benign:dev+builtin:benign_extra:dev",
                            metadata={"help": "benign prompts for the over-refusal check"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens generated per prompt when judging"})
    # rank 1 per round (one detector for "this kind of failure"), same per-rank scale as the default recipe
    train: dict[str, Any] = field(default_factory=lambda: {
        "rank": 1, "alpha": 16.0, "epochs": 2.0, "anchor_tokens": 24, "eval_every": 10, "dev_size": 40,
        "benign": "builtin:benign:train"},
        metadata={"help": "TrainConfig fields for each round's patch (others: the default recipe)"})


def split_pool(pool: list[Record], every: int) -> tuple[list[Record], list[Record]]:
    """(red-team half, held-out half): every `every`-th prompt is held out."""
    held = [r for i, r in enumerate(pool) if i % every == every - 1]
    work = [r for i, r in enumerate(pool) if i % every != every - 1]
    return work, held


def judge_attacks(model: Any, tok: Any, prompts: list[Record], attacks: tuple[str, ...], max_new_tokens: int,
                  desc: str = "red-teaming") -> list[dict[str, Any]]:
    """One row per (prompt, attack): the wrapped prompt, the answer, and whether it refused."""
    import torch

    from .evals.attacks import apply_attack
    from .generation import generate
    from .judges import keyword_refusal

    items = [(r, a, apply_attack(a, r.prompt)) for a in attacks for r in prompts]
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16,
                        enabled=_bf16(model)):
        gens = generate(model, tok, [w for _, _, w in items], GenerationConfig(max_new_tokens=max_new_tokens),
                        desc=desc)
    return [{"prompt": r.prompt, "attack": a, "wrapped": w, "response": g.text, "refused": keyword_refusal(g.text),
             "reference": r.response} for (r, a, w), g in zip(items, gens)]


def _bf16(model: Any) -> bool:
    from .train import _use_bf16

    return _use_bf16(TrainConfig(), next(model.parameters()).device.type)


def pick_failures(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to k answered (non-refused) rows, taken round-robin over attacks so every attack gets its share."""
    by_attack: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r["refused"]:
            by_attack.setdefault(r["attack"], []).append(r)
    out: list[dict[str, Any]] = []
    while len(out) < k and any(by_attack.values()):
        for a in sorted(by_attack):
            if by_attack[a] and len(out) < k:
                out.append(by_attack[a].pop(0))
    return out


def refusal_examples(failures: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Training rows for the failures: the wrapped prompt and a refusal (the pool's own, else a built-in one)."""
    from .data.builtin import builtin_split

    refusals = [r.response for r in builtin_split("harmful", "train") if r.response]
    return [{"prompt": f["wrapped"], "response": f["reference"] or refusals[i % len(refusals)]}
            for i, f in enumerate(failures)]


def rates(model: Any, tok: Any, held: list[Record], benign: list[Record], cfg: RedteamConfig) -> dict[str, Any]:
    """Held-out harmful refusal per attack and worst case per prompt, and benign refusal."""
    rows = judge_attacks(model, tok, held, cfg.attacks, cfg.max_new_tokens, desc="evaluating")
    per_attack = {a: sum(r["refused"] for r in rows if r["attack"] == a) / max(1, len(held)) for a in cfg.attacks}
    worst = sum(all(r["refused"] for r in rows if r["prompt"] == p.prompt) for p in held) / max(1, len(held))
    ben = judge_attacks(model, tok, benign, ("none",), cfg.max_new_tokens, desc="benign check")
    return {"harmful_plain": per_attack.get("none"), "harmful_worst_case": worst, "per_attack": per_attack,
            "benign_refusal": sum(r["refused"] for r in ben) / max(1, len(ben))}


def _attach(stack: Path, factory: Any) -> tuple[Any, Any]:
    """A fresh base model from `factory()` with the (verified) stack attached."""
    from .patch import load_patch

    model, tok = factory()
    return load_patch(model, stack), tok


def run_redteam(patch: str | Path, pool: list[Record], out_dir: str | Path, model_spec: str = "default",
                cfg: RedteamConfig | None = None, model_factory: Any = None, progress: bool = True) -> list[dict]:
    """Run `cfg.rounds` rounds starting from `patch`; returns one row per round (round 0 = the starting patch).

    `model_factory()` -> (model, tok) gives a fresh base model (default: load `model_spec`)."""
    from .config import ConfigError, from_dict
    from .data.readers import write_jsonl_atomic
    from .models import load_model
    from .patch import read_meta, verify_files
    from .patch_ops import stack_patches
    from .train import train

    cfg = cfg or RedteamConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    factory = model_factory or (lambda: load_model(model_spec))
    meta0 = verify_files(patch)
    work, held = split_pool(pool, cfg.holdout_every)
    if not work or not held:
        raise ConfigError(f"the pool has {len(pool)} prompts: too few to split into red-team and held-out halves")
    from .data.builtin import resolve_prompts

    benign = resolve_prompts(cfg.benign_dev, default_split="dev")
    parts = [Path(patch)]
    table: list[dict[str, Any]] = []
    for r in range(cfg.rounds + 1):
        rdir = out / f"round-{r}"
        done = rdir / "round.json"
        if done.exists():
            row = json.loads(done.read_text())
            table.append(row)
            parts = [Path(p) for p in row["parts"]]
            continue
        rdir.mkdir(parents=True, exist_ok=True)
        stack = Path(patch) if r == 0 else rdir / "stack"
        n_fail = None
        if r > 0:
            prev = out / f"round-{r - 1}"
            model, tok = _attach(prev_stack(prev, patch), factory)
            rows = judge_attacks(model, tok, work, cfg.attacks, cfg.max_new_tokens)
            failures = pick_failures(rows, cfg.per_round)
            n_fail = sum(not x["refused"] for x in rows)
            write_jsonl_atomic(rdir / "failures.jsonl", failures)
            if not failures:
                row = {"round": r, "failures_found": 0, "note": "no failures left on the red-team half",
                       "parts": [str(p) for p in parts]}
                atomic_write_json(done, row)
                table.append(row)
                break
            write_jsonl_atomic(rdir / "train.jsonl", refusal_examples(failures))
            merged = model.merge_and_unload()  # earlier patches frozen into the weights
            tcfg = from_dict(TrainConfig, {**cfg.train, "data": str(rdir / "train.jsonl"), "model": model_spec},
                             where="redteam train")
            run = rdir / "train"
            if run.exists() and not (run / "patch").exists():
                shutil.rmtree(run)  # an interrupted round trains again from scratch
            if not (run / "patch").exists():
                base_meta = dict(meta0["base_model"], trained_on_stack=str(prev_stack(prev, patch)))
                train(tcfg, run, model_and_tok=(merged, tok), progress=progress, base_model_meta=base_meta)
            del merged, model
            parts = parts + [run / "patch"]
            if stack.exists():
                shutil.rmtree(stack)
            stack_patches(parts, None, stack)
        model, tok = _attach(stack, factory)
        res = rates(model, tok, held, benign, cfg)
        row = {"round": r, "failures_found": n_fail, "trained_on": None if r == 0 else min(cfg.per_round, n_fail or 0),
               **res, "stack": str(stack), "parts": [str(p) for p in parts],
               "stack_rank": read_meta(stack).get("shape", {}).get("rank")}
        atomic_write_json(done, row)
        table.append(row)
        del model
    atomic_write_json(out / "redteam.json", {"patch": str(patch), "config": {
        "rounds": cfg.rounds, "attacks": list(cfg.attacks), "per_round": cfg.per_round, "train": cfg.train},
        "base_fingerprint": meta0["base_model"].get("fingerprint"), "rounds": table})
    return table


def prev_stack(prev_round_dir: Path, first_patch: str | Path) -> Path:
    """The stack a round starts from: the previous round's stack (round 0: the first patch itself)."""
    s = prev_round_dir / "stack"
    return s if s.exists() else Path(first_patch)


def format_table(table: list[dict[str, Any]]) -> str:
    head = f"{'round':>5}  {'failures':>8}  {'harmful plain':>13}  {'worst case':>10}  {'benign refusal':>14}  rank"
    lines = [head, "-" * len(head)]
    for row in table:
        if "harmful_plain" not in row:
            lines.append(f"{row['round']:>5}  {row.get('failures_found', 0):>8}  (stopped: {row.get('note', '')})")
            continue
        fails = "-" if row["failures_found"] is None else str(row["failures_found"])
        lines.append(f"{row['round']:>5}  {fails:>8}  {row['harmful_plain']:>13.0%}  {row['harmful_worst_case']:>10.0%}"
                     f"  {row['benign_refusal']:>14.1%}  {row.get('stack_rank')}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    r = sub.add_parser("redteam", help="red-team a patch in rounds: find failures (plain and jailbreak-wrapped), "
                                       "train a patch on them with earlier ones frozen, stack, evaluate")
    r.add_argument("--patch", required=True, help="the starting patch")
    r.add_argument("--pool", default="builtin:harmful:train",
                   help="harmful prompts to red-team with (file or builtin:...); a third is held out")
    r.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="comma-separated attack names")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--per-round", type=int, default=24, help="failures trained on per round")
    r.add_argument("--model", default="default")
    r.add_argument("--out", required=True, help="directory for the rounds (rerun to resume)")
    r.add_argument("--epochs", type=float, default=2.0, help="epochs for each round's patch")
    r.set_defaults(func=cmd_redteam)


def cmd_redteam(args: Any) -> int:
    from .data.builtin import resolve_prompts
    from .evals.attacks import ATTACKS

    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        from .config import ConfigError

        raise ConfigError(f"--attacks: unknown {unknown}; available: {sorted(ATTACKS)}")
    cfg = RedteamConfig(rounds=args.rounds, attacks=attacks, per_round=args.per_round)
    cfg.train = {**cfg.train, "epochs": args.epochs}
    pool = resolve_prompts(args.pool, response_field=None)
    table = run_redteam(args.patch, pool, args.out, args.model, cfg)
    print(format_table(table))
    print(f"rounds: {args.out}/redteam.json")
    return 0
