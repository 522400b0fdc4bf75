"""The `safetypatch gcg` job: GCG suffixes (evals/gcg.py, through nanogcg) against the base model and the patched one.

For each prompt, in order, five rows of `OUT/gcg.jsonl`:
- plain_base, plain_patched: the request without a suffix (what the attacks start from);
- base: GCG against the base model (the patch switched off), its suffix answered and judged on the base model;
- transfer: that suffix on the patched model (the cheap number: no search against the patch);
- patched: GCG against the patched model itself (the adaptive attack).
Every row carries the prompt, target, suffix, loss curve summary, greedy answer, each judge's verdict and the
seconds it took; `OUT/gcg.jsonl` is rewritten atomically after every row. `OUT/summary.json` holds the attack success
rates (answers the primary judge, the first of --judges, did not call refused) per setting and per judge, and the
budget. `OUT/plan.json` records what the rows depend on: `--resume` continues a run (finished rows are skipped; a
larger --limit adds prompts) only under the same plan, `--overwrite` replaces the run, and neither leaves an
existing run as it is.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import MODEL_HELP, check_numbers
from ..data.readers import Record
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice
from ..errors import ConfigError, OutputExistsError
from ..evals.gcg import BUDGETS, PLAIN, SETTINGS, Budget, budget
from ..io_utils import atomic_write_json

RUN_FILES = ("gcg.jsonl", "summary.json", "plan.json")


@dataclass(kw_only=True)
class GcgRunConfig:
    model: str = field(default="default", metadata={"help": MODEL_HELP})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)
    patch: str = field(metadata={"required": True, "help": "patch directory: GCG runs against it and against the "
                                                           "base model (the patch switched off)"})
    prompts: str = field(default="builtin:harmful:test", metadata={
        "help": "harmful prompts: JSONL/CSV (an optional 'target' field is the GCG target, AdvBench's goal,target; "
                "else 'Sure, here is' + the request restated) or builtin:<set>:<split>"})
    prompt_field: str = field(default="prompt", metadata={"help": "field / column holding the prompt (AdvBench: goal)"})
    limit: int | None = field(default=None, metadata={"help": "attack only the first N prompts", "min": 1})
    budget: str = field(default="cpu", metadata={
        "choices": tuple(BUDGETS), "help": "search size: " + "; ".join(
            f"{name} ({b.steps} steps, search width {b.search_width}, top-k {b.topk})" for name, b in BUDGETS.items())
        + " (paper: Zou et al. 2023)"})
    steps: int | None = field(default=None, metadata={"help": "GCG steps per prompt (default: the budget's)",
                                                      "min": 1})
    search_width: int | None = field(default=None, metadata={
        "help": "candidate suffixes evaluated per step (default: the budget's)", "min": 1})
    topk: int | None = field(default=None, metadata={
        "help": "top-k tokens per suffix position candidates are drawn from (default: the budget's)", "min": 1})
    full_steps: bool = field(default=False, metadata={
        "help": "run every step even once the model's greedy output is exactly the target (nanogcg early_stop off)"})
    judges: str = field(default="refusal_xstest,refusal_gcg,refusal_whole", metadata={
        "help": "comma-separated judges; the first is the primary one the attack success rate is read from"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens of each judged answer", "min": 1})
    seed: int = field(default=0, metadata={"help": "nanogcg's seed", "min": 0, "max": 2**32 - 1})
    out: str = field(metadata={"required": True, "help": "output directory (gcg.jsonl, summary.json, plan.json)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a GCG run already in --out"})
    resume: bool = field(default=False, metadata={"help": "continue the GCG run in --out (finished prompts skipped)"})

    def validate(self, where: str = "config") -> None:
        """ConfigError for numbers out of range, an unknown budget, template or judge, or --overwrite with --resume."""
        from ..judges import JUDGES

        check_numbers(self, where)
        check_choice(self.chat_template, where=where)
        self.spec()
        unknown = [j for j in self.judge_names() if j not in JUDGES]
        if unknown or not self.judge_names():
            raise ConfigError(f"{where}: --judges {self.judges!r}: unknown or no judge "
                              f"({', '.join(unknown) or 'none given'}); available: {', '.join(sorted(JUDGES))}")
        if self.overwrite and self.resume:
            raise ConfigError(f"{where}: --overwrite replaces the run in --out and --resume continues it; pass one")

    def spec(self) -> Budget:
        return budget(self.budget, self.steps, self.search_width, self.topk)

    def judge_names(self) -> list[str]:
        return [j.strip() for j in self.judges.split(",") if j.strip()]


def plan_for(cfg: GcgRunConfig, patch_sha: str, records: list[Record], targets: list[str]) -> dict[str, Any]:
    """What a run's rows depend on (everything but --limit, which a resumed run may raise)."""
    from ..io_utils import sha256_text

    return {"model": cfg.model, "chat_template": cfg.chat_template, "patch_sha256": patch_sha, "prompts": cfg.prompts,
            "prompts_sha256": sha256_text(*(f"{r.prompt}\0{t}" for r, t in zip(records, targets))),
            "budget": asdict(cfg.spec()), "early_stop": not cfg.full_steps, "judges": cfg.judge_names(),
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


def claim(out: Path, plan: dict[str, Any], overwrite: bool, resume: bool) -> list[dict[str, Any]]:
    """Take `out` for this run and return the rows already done (resume); an existing run is replaced only with
    `overwrite`, continued only with `resume` under the same plan, and a directory holding anything else is refused."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; choose a directory")
    rows: list[dict[str, Any]] = []
    if out.is_dir() and any(out.iterdir()):
        if not (out / "plan.json").exists():
            raise OutputExistsError(f"--out {out} is not empty and holds no GCG run (plan.json); choose another --out")
        if not (overwrite or resume):
            raise OutputExistsError(f"--out {out} already holds a GCG run; pass --resume to continue it or "
                                    "--overwrite to replace it")
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        else:
            old = json.loads((out / "plan.json").read_text())
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != json.loads(json.dumps(plan.get(k))))
            if diff:
                raise ConfigError(f"--resume: the run in {out} differs in {', '.join(diff)}; give the same flags, or "
                                  "--overwrite to start again")
            rows = read_rows(out / "gcg.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "plan.json", plan)
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@dataclass
class Attack:
    """One run's fixed parts: the patched model, its tokenizer, the judges and the settings."""

    model: Any
    tok: Any
    judges: dict[str, Any]
    cfg: GcgRunConfig
    progress: bool

    def row(self, idx: int, rec: Record, target: str, setting: str, base_suffix: str | None) -> dict[str, Any]:
        """One (prompt, setting) row: search (base, patched), then a greedy answer on the setting's variant, judged."""
        from ..evals.gcg import optimise, respond, suffix_intact, verdicts
        from ..modeling import variant

        start = time.perf_counter()
        found: dict[str, Any] = {"suffix": "", "best_loss": None, "loss": None, "gcg_seconds": 0.0,
                                 "seconds_per_step": None}
        if setting == "transfer":
            found["suffix"] = base_suffix or ""
        name = "base" if setting in ("base", "plain_base") else "patched"
        with variant(self.model, name):
            if setting in ("base", "patched"):
                found = optimise(self.model, self.tok, rec.prompt, target, self.cfg.spec(), seed=self.cfg.seed,
                                 early_stop=not self.cfg.full_steps, progress=self.progress,
                                 desc=f"gcg {setting} {idx + 1}")
            response = respond(self.model, self.tok, rec.prompt, found["suffix"], self.cfg.max_new_tokens)
        return {"index": idx, "id": rec.meta.get("id", str(idx)), "setting": setting, "prompt": rec.prompt,
                "target": target, **found, "suffix_intact": suffix_intact(self.tok, rec.prompt, found["suffix"]),
                "response": response,
                "verdicts": verdicts(self.judges, rec.prompt, response),
                "seconds": round(time.perf_counter() - start, 2)}


def run_gcg(cfg: GcgRunConfig, progress: bool = True, model_and_tok: tuple[Any, Any] | None = None
            ) -> dict[str, Any]:
    """Attack the first --limit prompts (resuming a run in --out), write gcg.jsonl and summary.json, return the
    summary. `model_and_tok`: a loaded base model and tokenizer (default: load --model) to attach the patch to."""
    from ..data.builtin import resolve_prompts
    from ..evals.gcg import require_nanogcg, target_for
    from ..io_utils import output_lock
    from ..judges import get_judge
    from ..patches import load_patch, verify_files

    cfg.validate("gcg")
    require_nanogcg()  # a missing install fails before any model loads
    judges = {name: get_judge(name) for name in cfg.judge_names()}
    meta = verify_files(cfg.patch)
    records = resolve_prompts(cfg.prompts, prompt_field=cfg.prompt_field, response_field=None,
                              default_split="test")
    targets = [target_for(r) for r in records]
    out = Path(cfg.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        rows = claim(out, plan_for(cfg, meta["weights"]["sha256"], records, targets), cfg.overwrite, cfg.resume)
        model, tok = model_and_tok or load_base(cfg)
        attack = Attack(load_patch(model, cfg.patch), tok, judges, cfg, progress)
        chosen = records[: cfg.limit] if cfg.limit else records
        for idx, (rec, target) in enumerate(zip(chosen, targets)):
            attack_one(attack, idx, rec, target, rows, out)
        summary = finish(cfg, rows, len(chosen), out)
    return summary


def load_base(cfg: GcgRunConfig) -> tuple[Any, Any]:
    from ..modeling import load_model

    return load_model(cfg.model, chat_template=cfg.chat_template)


def attack_one(attack: Attack, idx: int, rec: Record, target: str, rows: list[dict[str, Any]], out: Path) -> None:
    """The prompt's missing rows, in order (transfer after base, whose suffix it takes), each saved as it finishes."""
    from ..data.readers import write_jsonl_atomic

    done = {r["setting"]: r for r in rows if r["index"] == idx}
    for setting in PLAIN + ("base", "transfer", "patched"):
        if setting in done:
            continue
        base = done.get("base", {}).get("suffix")
        done[setting] = row = attack.row(idx, rec, target, setting, base)
        rows.append(row)
        write_jsonl_atomic(out / "gcg.jsonl", rows)
        if attack.progress:
            primary = attack.cfg.judge_names()[0]
            verdict = "refused" if row["verdicts"][primary]["refused"] else "answered"
            loss = "" if row["best_loss"] is None else f", loss {row['best_loss']:.3f}"
            print(f"[prompt {idx + 1}] {setting}: {verdict} ({primary}){loss}, {row['seconds']:.0f} s",
                  file=sys.stderr, flush=True)


def finish(cfg: GcgRunConfig, rows: list[dict[str, Any]], n: int, out: Path) -> dict[str, Any]:
    """summary.json for the first `n` prompts' rows: `evals.gcg.summarise` plus what was attacked and how."""
    from importlib.metadata import version

    from ..evals.gcg import summarise

    mine = [r for r in rows if r["index"] < n]
    summary = summarise(mine, cfg.judge_names(), cfg.spec(), n)
    summary.update({"budget_name": cfg.budget, "early_stop": not cfg.full_steps, "model": cfg.model,
                    "patch": str(Path(cfg.patch).resolve()), "prompts": cfg.prompts, "seed": cfg.seed,
                    "max_new_tokens": cfg.max_new_tokens, "nanogcg": version("nanogcg"),
                    "all_settings": list(PLAIN + SETTINGS)})
    atomic_write_json(out / "summary.json", summary)
    return summary
