"""The suite job: `safetypatch eval --suite NAME` as named steps.

load the suite -> prepare its entries (data, judges) -> open the backend (base model, patch attached or a fine-tuned
model paired with it) -> generate every answer once -> measure each entry (judging safety answers) -> write
samples.jsonl, utility_samples.jsonl and summary.json -> record the run in the results DB.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from ..config import INT_MAX, GenerationConfig
from ..errors import ConfigError, SuiteError
from ..evals.suite import (Measured, Prepared, RunContext, Suite, SuiteRunConfig, add_differences, build_judges,
                           chat_key, drop_unpaired, generation_config, load_suite, nest, prepare)
from ..modeling import Chat, Generation
from ..modeling.backends import Backend


def run_suite(cfg: SuiteRunConfig, out_dir: str | Path, resume: bool = False,
              model_and_tok: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Evaluate base (and patched, with a patch) on every entry; write samples.jsonl, utility_samples.jsonl and
    summary.json under `out_dir`, record the run in the results DB, and return the summary."""
    from ..io_utils import claim_output_dir

    t0 = time.time()
    if cfg.patch and cfg.finetuned:
        raise ConfigError("give either --patch or --finetuned to compare with the base model, not both")
    for name in ("limit", "max_new_tokens", "batch_size"):  # the command line checks these too (EvalConfig)
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT_MAX):
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1 (or unset), got {value!r}")
    suite = load_suite(cfg.suite)
    out = claim_output_dir(out_dir, resume=resume, marker="summary.json")
    log = suite_log(suite)
    notes: list[str] = []
    prepared = prepare_entries(suite, cfg, notes)
    gen = generation_config(suite, cfg)
    judges = build_judges([j for p in prepared for j in p.all_judges()], cfg.judge_models, cfg.device)
    variants = ["base", "patched"] if cfg.patch or cfg.finetuned else ["base"]
    if variants == ["base"]:
        prepared = drop_unpaired(prepared, notes)
    backend, fingerprint = open_backend(cfg, log, model_and_tok, scoring=[p.entry.name for p in prepared
                                                                         if p.entry.scores])
    answers = generate_answers(backend, prepared, variants, gen, log, t0)
    measured = measure(prepared, RunContext(backend, variants, gen, answers, judges, log))
    summary = summarize(suite, cfg, prepared, gen, notes, fingerprint, measured.metrics, t0)
    write_files(out, summary, measured)
    write_prefill_curve(out, prepared, measured.metrics)
    if cfg.record:
        record(out, summary, cfg, measured)
    return summary


def suite_log(suite: Suite) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[suite {suite.name}] {msg}", file=sys.stderr, flush=True)
    return log


def prepare_entries(suite: Suite, cfg: SuiteRunConfig, notes: list[str]) -> list[Prepared]:
    """Every entry with its data; the notes so far are printed; every entry skipped is an error."""
    prepared = prepare(suite, cfg, notes)
    for n in notes:
        print(f"note: {n}", file=sys.stderr, flush=True)
    if not prepared:
        raise SuiteError(f"{suite.source}: every entry was skipped (see the notes above); give --data-root DIR "
                         "or set SAFETYPATCH_DATA")
    return prepared


def open_backend(cfg: SuiteRunConfig, log: Callable[[str], None], model_and_tok: tuple[Any, Any] | None = None,
                 scoring: list[str] | None = None) -> tuple[Backend, str | None]:
    """The backend over the base model (with the patch, or paired with the fine-tuned model), and the base model's
    fingerprint id. `cfg.backend` vllm: one engine for base and patched; the entries named in `scoring` (they need
    log-likelihoods / KL) go to a transformers backend loaded when first needed; the fingerprint is None (vLLM's
    weights are not in this process)."""
    from ..evals.backend import check_backend_choice, open_eval_backend, transformers_backend
    from ..modeling import fingerprint, fingerprint_id, load_model

    check_backend_choice(cfg.backend, cfg.finetuned)
    log(f"loading {cfg.model}" + (f" with patch {cfg.patch}" if cfg.patch else "")
        + (" in vLLM" if cfg.backend.key() == "vllm" else ""))
    if cfg.backend.key() == "vllm":
        return open_eval_backend(cfg.backend, cfg.model, cfg.patch, cfg.chat_template, cfg.device,
                                 load=(lambda: model_and_tok) if model_and_tok else None, scoring=scoring or [],
                                 log=log), None
    model, tok = model_and_tok or load_model(cfg.model, device=cfg.device, chat_template=cfg.chat_template)
    fp = fingerprint_id(fingerprint(model))
    if cfg.finetuned:  # its answers are the 'patched' rows
        log(f"loading the fine-tuned model {cfg.finetuned}")
    return transformers_backend(model, tok, patch=cfg.patch, finetuned=cfg.finetuned, device=cfg.device), fp


def generate_answers(backend: Backend, prepared: list[Prepared], variants: list[str], gen: GenerationConfig,
                     log: Callable[[str], None], t0: float) -> dict[tuple[str, int, str], Generation]:
    """Every answer the entries request, each unique (variant, max_new_tokens, chat) generated once, one
    length-sorted batch list per variant and length; then the entries' `followups` (built from those answers, e.g.
    prefilled with them), generated the same way."""
    answers: dict[tuple[str, int, str], Generation] = {}
    generate_jobs(backend, [r for p in prepared for r in p.entry.requests(p, variants, gen)], variants, gen, answers,
                  log, t0)
    later = [r for p in prepared for r in p.entry.followups(p, variants, gen, answers, backend.tok)]
    if later:
        generate_jobs(backend, later, variants, gen, answers, log, t0)
    return answers


def generate_jobs(backend: Backend, requests: list[tuple[str, int, list[Chat]]], variants: list[str],
                  gen: GenerationConfig, answers: dict[tuple[str, int, str], Generation], log: Callable[[str], None],
                  t0: float) -> None:
    """The answers to `requests` not in `answers` yet, added to it."""
    jobs: dict[tuple[str, int], dict[str, Chat]] = defaultdict(dict)
    for v, m, chats in requests:
        for c in chats:
            if (v, m, chat_key(c)) not in answers:
                jobs[(v, m)].setdefault(chat_key(c), c)
    total = sum(len(c) for c in jobs.values())
    done = 0
    for (v, m), chats in sorted(jobs.items(), key=lambda kv: (variants.index(kv[0][0]), kv[0][1])):
        log(f"{v}: generating {len(chats)} answers (max {m} new tokens; {done}/{total} done, "
            f"{time.time() - t0:.0f} s)")
        gens = backend.generate(list(chats.values()), dataclasses.replace(gen, max_new_tokens=m), variant=v,
                                desc=f"{v} (max {m} tokens)")
        for k, g in zip(chats, gens):
            answers[(v, m, k)] = g
        done += len(chats)


def measure(prepared: list[Prepared], run: RunContext) -> Measured:
    """Every entry's metrics and rows: safety entries first, then utility entries, each in suite order; with a
    patched variant, the patched - base differences after them."""
    out = Measured()
    for p in sorted(prepared, key=lambda p: p.entry.utility):
        got = p.entry.measure(p, run)
        out.metrics += got.metrics
        out.samples += got.samples
        out.utility += got.utility
    if "patched" in run.variants:
        add_differences(out.metrics)
    return out


def summarize(suite: Suite, cfg: SuiteRunConfig, prepared: list[Prepared], gen: GenerationConfig, notes: list[str],
              fp: str, metrics: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """summary.json: what ran on what, every entry, the notes, the metrics (flat and nested)."""
    from ..patches import read_meta

    patch_sha = read_meta(cfg.patch).get("weights", {}).get("sha256") if cfg.patch else None
    return {
        "suite": suite.name, "suite_file": suite.source, "model": cfg.model, "model_fingerprint": fp,
        "patch": str(Path(cfg.patch).resolve()) if cfg.patch else None, "patch_sha256": patch_sha,
        "finetuned": str(Path(cfg.finetuned).resolve()) if cfg.finetuned else None,
        "data_root": cfg.data_root_or_default(), "generation": dataclasses.asdict(gen),
        "entries": {p.entry.name: p.entry.describe(p) for p in prepared}, "notes": notes, "metrics": metrics,
        "results": nest(metrics), "seconds": round(time.time() - t0, 1), "run_id": None, "db": None,
    }


def write_files(out: Path, summary: dict[str, Any], measured: Measured) -> None:
    """samples.jsonl, utility_samples.jsonl and summary.json."""
    from ..data.readers import write_jsonl_atomic
    from ..io_utils import atomic_write_json

    write_jsonl_atomic(out / "samples.jsonl", measured.samples)
    write_jsonl_atomic(out / "utility_samples.jsonl", measured.utility)
    atomic_write_json(out / "summary.json", summary)


def write_prefill_curve(out: Path, prepared: list[Prepared], metrics: list[dict[str, Any]]) -> None:
    """DIR/prefill_curve.svg when a prefill entry ran: the refusal rate against k, one line per variant and judge
    (the start-of-answer judge misses a refusal that breaks off mid-sentence, the whole-answer one does not: both
    are drawn), one panel per prefill entry."""
    from ..reports.svg import Hover, figure_svg, pyplot

    panels = [(p.entry.name, p.judges) for p in prepared if p.entry.type == "prefill" and p.judges]
    if not panels:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.4), squeeze=False)
    for ax, (name, judges) in zip(axes[0], panels):
        for v, color in (("base", "tab:blue"), ("patched", "tab:orange")):
            for judge, style in zip(judges, ("-", "--", ":", "-.")):
                pts = sorted((int(m["attack"][len("prefill_k"):]), m["value"]) for m in metrics
                             if m["variant"] == v and m["benchmark"] == name and m["judge"] == judge
                             and m["metric"] in ("refusal_rate", "safe_rate") and m["attack"].startswith("prefill_k")
                             and m["value"] is not None)
                if pts:
                    ax.plot([k for k, _ in pts], [r for _, r in pts], marker="o", linestyle=style, color=color,
                            label=f"{v} ({judge})")
        ax.set(title=name, xlabel="prefilled tokens k", ylabel="refusal rate", ylim=(-0.03, 1.03))
        ax.legend(frameon=False, fontsize=7)
    (out / "prefill_curve.svg").write_text(figure_svg(fig, Hover("prefill")))


def store_samples(samples: list[dict[str, Any]], utility_rows: list[dict[str, Any]],
                  entries: dict[str, Any]) -> list[Any]:
    """The results DB's sample rows: one per safety answer and judge, one per utility item."""
    from ..evals.store import SampleRow

    out = [SampleRow(variant=r["model"], benchmark=r["benchmark"], prompt=r["prompt"], response=r["response"],
                     judge=j, label=r.get(f"{j}_label"), refused=r[j], score=r.get(f"{j}_score"),
                     attack=r["attack"], item_id=str(r.get("id", r["index"])))
           for r in samples for j in entries[r["benchmark"]]["judges"]
           + ([entries[r["benchmark"]]["class_judge"]] if entries[r["benchmark"]]["class_judge"] else [])]
    for r in utility_rows:
        score = r.get("kl_per_token") if r["type"] == "kl" else float(bool(r.get("correct")))
        out.append(SampleRow(variant=r["model"], benchmark=r["benchmark"], prompt=r["prompt"], response=r["response"],
                             judge=r["type"], score=score, item_id=str(r.get("id", ""))))
    return out


def record(out: Path, summary: dict[str, Any], cfg: SuiteRunConfig, measured: Measured) -> None:
    """Record the run in the results DB; summary.json is rewritten with its run id and the DB's path."""
    from ..evals.store import MetricRow, ResultsStore, RunInfo
    from ..io_utils import atomic_write_json

    info = RunInfo(model_spec=cfg.model, name=cfg.name or Path(out).resolve().name, suite=summary["suite"],
                   model_fingerprint=summary["model_fingerprint"], patch_path=summary["patch"],
                   patch_sha256=summary["patch_sha256"],
                   config={"suite_file": summary["suite_file"], "out": str(Path(out).resolve()),
                           "finetuned": summary["finetuned"], "data_root": summary["data_root"],
                           "generation": summary["generation"], "limit": cfg.limit, "entries": summary["entries"],
                           "notes": summary["notes"]})
    rows = store_samples(measured.samples, measured.utility, summary["entries"])
    with ResultsStore(cfg.db) as store:
        run_id = store.record_run(info, [MetricRow(**m) for m in summary["metrics"]], rows)
        summary["run_id"], summary["db"] = run_id, str(store.path)
    atomic_write_json(out / "summary.json", summary)
