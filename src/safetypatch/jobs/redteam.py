"""Red-teaming rounds (paper A's lifelong patching): find what the patched model still answers, patch that, stack.

Round r:
1. the current stack (the first patch plus every earlier round's patch, combined exactly by `stack_patches`) is
   attached to the base model;
2. every pool prompt of the red-team half, plain and wrapped by each attack, is generated and judged
   (`keyword_refusal`); answered ones are the failures (at most `per_round`, spread over attacks);
3. each failure becomes a refusal example (the pool record's own response, else a generic refusal);
4. a new patch is trained on them with the current stack merged into the weights (so earlier patches are frozen)
   and benign anchors answered by that model, and recorded as a patch for the true base model;
5. the stack grows by the new patch, and is evaluated on the held-out third of the pool (plain, and worst case
   over attacks), on benign dev prompts (over-refusal), and by the KL drift from the base model along its own
   answers to those benign prompts (`evals.utility.kl.kl_to_base`: KL(base || patched) per answer token, the
   end-of-turn token of a finished answer included; a cheap utility measure).
Every round's directory keeps its failures, patch, stack and numbers (`round.json`); `plan.json` records what the
run depends on, so a rerun of the same command skips finished rounds and a different one is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GenerationConfig
from ..training.config import TrainConfig
from ..data.readers import Record
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice
from ..io_utils import atomic_write_json

DEFAULT_ATTACKS = ("none", "prefix_injection", "refusal_suppression", "aim")
NO_FAILURES_LEFT = "no failures left on the red-team half"


@dataclass
class RedteamConfig:
    rounds: int = field(default=3, metadata={"help": "red-teaming rounds", "min": 0})
    attacks: tuple[str, ...] = field(default=DEFAULT_ATTACKS, metadata={
        "help": "attack names, comma separated ('none' = plain, always included)"})
    per_round: int = field(default=24, metadata={"help": "failures turned into training examples per round",
                                                  "min": 1})
    holdout_every: int = field(default=3, metadata={"help": "every k-th pool prompt is held out for evaluation",
                                                    "min": 2})
    benign_dev: str = field(default="builtin:benign:dev+builtin:benign_extra:dev",
                            metadata={"help": "benign prompts for the over-refusal check"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens generated per prompt when judging", "min": 1})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)
    min_refusals: int = field(default=96, metadata={"help": "a round's failures are repeated until it trains on at "
                                                            "least this many refusal rows", "min": 0})
    # rank 1 per round (one detector for "this kind of failure"), same per-rank scale as the default recipe; its
    # anchors (built-in benign + look-alikes) too. Early stopping checks the round's own failures (dev_harmful)
    train: dict[str, Any] = field(default_factory=lambda: {
        "rank": 1, "alpha": 16.0, "epochs": 2.0, "eval_every": 10, "dev_size": 40},
        metadata={"help": "TrainConfig fields for each round's patch (others: the default recipe)"})

    def validate(self, where: str = "config") -> None:
        """ConfigError for numbers out of range, unknown attacks or a missing plain 'none', and a `train` recipe
        that TrainConfig refuses (checked now, not when round 1 starts training)."""
        from ..config import check_numbers, from_dict
        from ..errors import ConfigError
        from ..evals.attacks import ATTACKS

        check_numbers(self, where)
        check_choice(self.chat_template, where=where)
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or "none" not in self.attacks:
            raise ConfigError(f"{where}: field 'attacks' (--attacks) must include 'none' (the plain prompts) and "
                              f"name known attacks; unknown: {unknown}; available: {sorted(ATTACKS)}")
        if not isinstance(self.train, dict):
            raise ConfigError(f"{where}: field 'train' must be a mapping of TrainConfig fields")
        from_dict(TrainConfig, self.train, where=f"{where}: train (each round's recipe)")


def split_pool(pool: list[Record], every: int) -> tuple[list[Record], list[Record]]:
    """(red-team half, held-out half): every `every`-th prompt is held out."""
    held = [r for i, r in enumerate(pool) if i % every == every - 1]
    work = [r for i, r in enumerate(pool) if i % every != every - 1]
    return work, held


def judge_attacks(model: Any, tok: Any, prompts: list[Record], attacks: tuple[str, ...], max_new_tokens: int,
                  desc: str = "red-teaming", progress: bool = True) -> list[dict[str, Any]]:
    """One row per (prompt, attack): the wrapped prompt, the answer, and whether it refused."""
    from ..evals.attacks import apply_attack
    from ..judges import keyword_refusal
    from ..modeling import generate
    from ..training.config import bf16_autocast, use_bf16

    items = [(r, a, apply_attack(a, r.prompt)) for a in attacks for r in prompts]
    device = next(model.parameters()).device.type
    with bf16_autocast(device, use_bf16(TrainConfig().bf16, device)):
        gens = generate(model, tok, [w for _, _, w in items], GenerationConfig(max_new_tokens=max_new_tokens),
                        desc=desc, progress=progress)
    return [{"prompt": r.prompt, "attack": a, "wrapped": w, "response": g.text, "refused": keyword_refusal(g.text),
             "reference": r.response} for (r, a, w), g in zip(items, gens)]


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


# Topic-neutral refusals in the built-in set's style. The built-in refusals name their topic ("Sorry, I can't help
# with SIM swapping ..."), so one drawn at random teaches mismatched answers, and matching prompts by shared words
# picked the wrong topic for most built-in test prompts; a pool's own refusals are used whenever it has them.
GENERIC_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "Sorry, I can't help with that request.",
    "I cannot help with that. If there's something else you need, I'm happy to help.",
    "I apologize, but I'm not able to help with this.",
)


def refusal_examples(failures: list[dict[str, Any]], min_rows: int = 0) -> list[dict[str, str]]:
    """Training rows for the failures: the wrapped prompt and a refusal (the pool's own, else a generic one),
    repeated in order until there are at least `min_rows`: a handful of failures among hundreds of benign anchors
    is otherwise too weak a signal to move the model (a 6-failure round with no repetition left them all answered)."""
    rows = [{"prompt": f["wrapped"], "response": f["reference"] or GENERIC_REFUSALS[i % len(GENERIC_REFUSALS)]}
            for i, f in enumerate(failures)]
    if not rows:
        return rows
    reps = max(1, -(-min_rows // len(rows)))
    return rows * reps


def rates(model: Any, tok: Any, held: list[Record], benign: list[Record], cfg: RedteamConfig,
          base: list[Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Held-out harmful refusal per attack and worst case per prompt, benign refusal, and (given the base model's
    benign answers `base`, Generation-like) the KL drift along them: `kl_to_base`'s per-token KL(base || patched),
    0 when the patch changes nothing there."""
    from ..evals.utility.kl import kl_to_base

    rows = judge_attacks(model, tok, held, cfg.attacks, cfg.max_new_tokens, desc="evaluating", progress=progress)
    per_attack = {a: sum(r["refused"] for r in rows if r["attack"] == a) / max(1, len(held)) for a in cfg.attacks}
    worst = sum(all(r["refused"] for r in rows if r["prompt"] == p.prompt) for p in held) / max(1, len(held))
    ben = judge_attacks(model, tok, benign, ("none",), cfg.max_new_tokens, desc="benign check", progress=progress)
    out = {"harmful_plain": per_attack.get("none"), "harmful_worst_case": worst, "per_attack": per_attack,
           "benign_refusal": sum(r["refused"] for r in ben) / max(1, len(ben))}
    if base is not None:
        out["benign_kl"] = kl_to_base(model, tok, benign, base_answers=base, progress=False).kl_per_token
    return out


def benign_base_answers(model: Any, tok: Any, benign: list[Record], max_new_tokens: int,
                        progress: bool = True) -> list[Any]:
    """The base model's greedy answers to the benign prompts (adapter off; cached by `training.anchors`)."""
    from ..modeling import Generation
    from ..training.anchors import base_answers

    answers = base_answers(model, tok, benign, max_new_tokens, batch_size=GenerationConfig().batch_size,
                           progress=progress)
    return [Generation(tok.decode(ids, skip_special_tokens=True), ids, finished) for ids, finished in answers]


def attach(stack: Path, factory: Any) -> tuple[Any, Any]:
    """A fresh base model from `factory()` with the (verified) stack attached."""
    from ..patches import load_patch

    model, tok = factory()
    return load_patch(model, stack), tok


def run_plan(patch_meta: dict[str, Any], pool: list[Record], cfg: RedteamConfig, model_spec: str) -> dict[str, Any]:
    """What a run directory's rounds depend on (all but the number of rounds, which a rerun may raise)."""
    from ..io_utils import sha256_text

    return {"patch_sha256": patch_meta["weights"]["sha256"], "model": model_spec,
            "pool_sha256": sha256_text(*(f"{r.prompt}\0{r.response or ''}" for r in pool)), "pool_size": len(pool),
            "attacks": list(cfg.attacks), "per_round": cfg.per_round, "holdout_every": cfg.holdout_every,
            "benign_dev": cfg.benign_dev, "max_new_tokens": cfg.max_new_tokens, "min_refusals": cfg.min_refusals,
            "train": cfg.train, **({"chat_template": cfg.chat_template} if cfg.chat_template != "auto" else {})}


def claim_run(out: Path, plan: dict[str, Any]) -> None:
    """A new run directory, or the same run resumed; a different plan in an existing directory is an error."""
    from ..errors import ConfigError
    from ..io_utils import claim_output_dir

    claim_output_dir(out, resume=True)  # a file in the way is a clear error; an existing run is checked below
    plan_file = out / "plan.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != json.loads(json.dumps(plan.get(k))))
        if diff:
            raise ConfigError(f"{out} holds red-teaming rounds of another run (differs in {', '.join(diff)}); "
                              "choose another --out")
    elif any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no red-teaming plan.json; choose another --out")
    else:
        atomic_write_json(plan_file, plan)


def stored_path(p: Path, out: Path) -> str:
    """How round.json records a path: relative to the run directory when inside it (the run can be moved, and
    resumed from any working directory), absolute otherwise."""
    p = p.resolve()
    return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)


def read_path(s: str, out: Path) -> Path:
    """The inverse of stored_path; a relative path that is not inside `out` is one of an older run's, written
    relative to the directory it was started from."""
    p = Path(s)
    if not p.is_absolute() and not (out / p).exists() and p.exists():
        return p
    return out / p  # an absolute path stays as it is


@dataclass
class Rounds:
    """One red-teaming run: its fixed inputs, and the stack the next round starts from."""

    patch: Path
    out: Path
    cfg: RedteamConfig
    model_spec: str
    meta0: dict[str, Any]  # the starting patch's patch.json
    work: list[Record]  # the red-team half of the pool
    held: list[Record]  # the held-out half
    benign: list[Record]
    factory: Any
    progress: bool
    parts: list[Path] = field(default_factory=list)  # the patches the current stack is made of
    current: Path | None = None  # the current stack

    def resume(self, r: int) -> dict[str, Any] | None:
        """Round r's row when it is finished (and the stack it left), else None."""
        done = self.out / f"round-{r}" / "round.json"
        if not done.exists():
            return None
        row = json.loads(done.read_text())
        self.parts = [read_path(p, self.out) for p in row["parts"]]
        self.current = read_path(row["stack"], self.out) if "stack" in row else self.current
        return row

    def run(self, r: int) -> dict[str, Any]:
        """Round r: (from round 1) find failures, train on them and grow the stack; then evaluate the stack."""
        from ..patches import stack_patches

        rdir = self.out / f"round-{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        stack, n_fail = self.patch, None
        if r > 0:
            model, tok = attach(self.current, self.factory)
            failures, n_fail = self.find_failures(model, tok, rdir)
            if not failures:
                return self.record(rdir, {"round": r, "failures_found": 0, "note": NO_FAILURES_LEFT,
                                          "parts": [stored_path(p, self.out) for p in self.parts]})
            self.parts = self.parts + [self.train_round(model, tok, failures, rdir)]
            del model
            stack = rdir / "stack"
            stack_patches(self.parts, None, stack, overwrite=True)  # a leftover from an interrupted round is replaced
        row = {"round": r, "failures_found": n_fail,
               "trained_on": None if r == 0 else min(self.cfg.per_round, n_fail or 0), **self.evaluate(stack),
               "stack": stored_path(stack, self.out), "parts": [stored_path(p, self.out) for p in self.parts],
               "stack_rank": json.loads((stack / "adapter_config.json").read_text()).get("r")}
        self.current = stack
        return self.record(rdir, row)

    def find_failures(self, model: Any, tok: Any, rdir: Path) -> tuple[list[dict[str, Any]], int]:
        """Judge every (red-team prompt, attack) on the current stack; the failures to train on and how many
        answers were not refusals. Both are kept in the round's directory."""
        from ..data.readers import write_jsonl_atomic

        rows = judge_attacks(model, tok, self.work, self.cfg.attacks, self.cfg.max_new_tokens, progress=self.progress)
        failures = pick_failures(rows, self.cfg.per_round)
        write_jsonl_atomic(rdir / "judged.jsonl", rows)  # every (prompt, attack) answer and its verdict
        write_jsonl_atomic(rdir / "failures.jsonl", failures)
        return failures, sum(not x["refused"] for x in rows)

    def train_round(self, model: Any, tok: Any, failures: list[dict[str, Any]], rdir: Path) -> Path:
        """Train the round's patch on the failures with the current stack merged into the weights (earlier patches
        frozen); an interrupted round trains again from scratch. Returns the new patch's directory."""
        from ..config import from_dict
        from ..data.readers import write_jsonl_atomic
        from .train import train

        write_jsonl_atomic(rdir / "train.jsonl", refusal_examples(failures, self.cfg.min_refusals))
        write_jsonl_atomic(rdir / "dev.jsonl", refusal_examples(failures))
        merged = model.merge_and_unload()  # earlier patches frozen into the weights
        # early stopping checks refusal on this round's own (wrapped) failures, never on the held-out prompts
        tcfg = from_dict(TrainConfig, {"dev_harmful": str(rdir / "dev.jsonl"), **self.cfg.train,
                                       "data": str(rdir / "train.jsonl"), "model": self.model_spec,
                                       "chat_template": self.cfg.chat_template},
                         where="redteam train")
        run = rdir / "train"
        if run.exists() and not (run / "patch").exists():
            shutil.rmtree(run)
        if not (run / "patch").exists():
            base_meta = dict(self.meta0["base_model"], trained_on_stack=str(self.current.resolve()))
            train(tcfg, run, model_and_tok=(merged, tok), progress=self.progress, base_model_meta=base_meta)
        return run / "patch"

    def evaluate(self, stack: Path) -> dict[str, Any]:
        """`rates` of the stack on the held-out prompts and the benign dev prompts."""
        model, tok = attach(stack, self.factory)
        base = benign_base_answers(model, tok, self.benign, self.cfg.max_new_tokens, self.progress)
        return rates(model, tok, self.held, self.benign, self.cfg, base, progress=self.progress)

    def record(self, rdir: Path, row: dict[str, Any]) -> dict[str, Any]:
        atomic_write_json(rdir / "round.json", row)
        return row


def run_redteam(patch: str | Path, pool: list[Record], out_dir: str | Path, model_spec: str = "default",
                cfg: RedteamConfig | None = None, model_factory: Any = None, progress: bool = True) -> list[dict]:
    """Run `cfg.rounds` rounds starting from `patch`; returns one row per round (round 0 = the starting patch).

    `model_factory()` -> (model, tok) gives a fresh base model (default: load `model_spec`). Rerunning with the
    same arguments resumes (finished rounds are read back, an interrupted round's training restarts)."""
    rounds = setup(patch, pool, out_dir, model_spec, cfg or RedteamConfig(), model_factory, progress)
    table: list[dict[str, Any]] = []
    for r in range(rounds.cfg.rounds + 1):
        row = rounds.resume(r) or rounds.run(r)
        table.append(row)
        if row.get("failures_found") == 0:
            break
    atomic_write_json(rounds.out / "redteam.json", {"patch": str(Path(patch).resolve()), "config": {
        "rounds": rounds.cfg.rounds, "attacks": list(rounds.cfg.attacks), "per_round": rounds.cfg.per_round,
        "train": rounds.cfg.train}, "base_fingerprint": rounds.meta0["base_model"].get("fingerprint"),
        "held_out": len(rounds.held), "red_team": len(rounds.work), "benign_dev": len(rounds.benign), "rounds": table})
    return table


def setup(patch: str | Path, pool: list[Record], out_dir: str | Path, model_spec: str, cfg: RedteamConfig,
          model_factory: Any, progress: bool) -> Rounds:
    """Check the config and the patch (before any model is loaded), split the pool and claim the run directory."""
    from ..data.builtin import resolve_prompts
    from ..errors import ConfigError
    from ..modeling import load_model
    from ..patches import verify_files

    cfg.validate("redteam")
    meta0 = verify_files(patch)  # a missing or damaged patch fails before any model is loaded
    work, held = split_pool(pool, cfg.holdout_every)
    if not work or not held:
        raise ConfigError(f"the pool has {len(pool)} prompts: too few to split into red-team and held-out halves")
    benign = resolve_prompts(cfg.benign_dev, default_split="dev", response_field=None)
    out = Path(out_dir).resolve()
    claim_run(out, run_plan(meta0, pool, cfg, model_spec))
    factory = model_factory or (lambda: load_model(model_spec, chat_template=cfg.chat_template))
    return Rounds(Path(patch), out, cfg, model_spec, meta0, work, held, benign, factory, progress,
                  parts=[Path(patch)], current=Path(patch))


def format_table(table: list[dict[str, Any]]) -> str:
    """The per-round table: failures found, held-out harmful refusal (plain, worst case over attacks), benign
    refusal, KL drift on benign answers, stack rank; a round that stopped early says why."""
    from ..tables import render_table

    head = ("round", "failures", "harmful plain", "worst case", "benign refusal", "benign KL", "rank")
    rows = [[str(row["round"]), "-" if row["failures_found"] is None else str(row["failures_found"]),
             f"{row['harmful_plain']:.0%}", f"{row['harmful_worst_case']:.0%}", f"{row['benign_refusal']:.1%}",
             f"{row['benign_kl']:.3g}" if row.get("benign_kl") is not None else "-", str(row.get("stack_rank"))]
            for row in table if "harmful_plain" in row]
    lines = render_table(head, rows, right=[True] * 6 + [False], rule=False).split("\n")
    lines.insert(1, "-" * len(lines[0]))
    w_round, w_fail = (max([len(head[i])] + [len(r[i]) for r in rows]) for i in (0, 1))
    lines += [f"{row['round']:>{w_round}}  {row.get('failures_found', 0):>{w_fail}}  (stopped: {row.get('note', '')})"
              for row in table if "harmful_plain" not in row]
    return "\n".join(lines)
