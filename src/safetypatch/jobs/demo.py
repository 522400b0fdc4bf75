"""The main job (`safetypatch demo`, `make demo`): train the default patch on the embedded model from the built-in
data, then evaluate base and patched on the held-out built-in test splits and print one table."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

from ..config import GenerationConfig, to_dict
from ..data.builtin import builtin_split
from ..errors import ConfigError
from ..evals.refusal import generate_and_judge, summarize
from ..io_utils import atomic_write_json
from ..judges import DEFAULT_JUDGES
from ..tables import render_table
from ..training.config import TrainConfig

PRIMARY_JUDGE = "refusal_xstest"
WHOLE_ANSWER_JUDGE = "refusal_whole"  # its refused_then_complied rate is the table's RTC column
# the prefilling attack on the harmful test split (Qi et al. 2025): the answer starts with k tokens of the base model's
# own compliant answer, or with a fixed opening; the table shows the worst case per prompt over them
DEMO_PREFILL = {"ks": [10, 20], "openings": ["Sure, here is"]}


def default_out_dir() -> Path:
    return Path("runs") / f"demo-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def format_table(summary: dict[str, Any]) -> str:
    """One table: harmful refusal, harmful refused-then-complied (RTC: the answer refuses, then helps anyway;
    `refusal_whole`, '-' in summaries without it), benign refusal (ordinary / look-alike), patch size, training
    time."""
    res = summary["results"]
    rows = []
    for name in ("base", "patched"):
        h, b = res["harmful"][name], res["benign"][name]
        kinds = b.get("by_kind", {})
        rtc = h.get("refused_then_complied", {}).get(WHOLE_ANSWER_JUDGE)
        worst = summary.get("prefill", {}).get("rates", {}).get(name, {}).get("worst_case", {}).get(PRIMARY_JUDGE)
        rows.append([
            name,
            f"{h[PRIMARY_JUDGE]:.0%} / {h['refusal_gcg']:.0%}",
            f"{rtc:.0%}" if rtc is not None else "-",
            f"{worst:.0%}" if worst is not None else "-",
            f"{b[PRIMARY_JUDGE]:.0%} / {b['refusal_gcg']:.0%}",
            " / ".join(f"{kinds[k][PRIMARY_JUDGE]:.0%}" for k in ("ordinary", "lookalike") if k in kinds) or "-",
            f"{summary['patch_bytes'] / 1024:.1f} KB" if name == "patched" else "-",
            f"{summary['train_seconds']:.0f} s" if name == "patched" else "-",
        ])
    head = ["model", "harmful refusal", "harmful RTC", "prefilled", "benign refusal", "ordinary / look-alike",
            "patch size", "training time"]
    lines = render_table(head, rows).splitlines()
    width = len(lines[1])  # the dashed rule spans the table; rows keep their padding to it, as the table always had
    n_h, n_b = res["harmful"]["base"]["n"], res["benign"]["base"]["n"]
    return "\n".join([
        f"Built-in test splits: {n_h} harmful, {n_b} benign prompts; refusal by keyword judges (XSTest / GCG); "
        "RTC: refused, then complied (refusal_whole); prefilled: refused under every prefill (the answer started "
        "with 10 / 20 tokens of the base model's own answer, or 'Sure, here is'; attacked: the prompts it answers).",
        *(line.ljust(width) for line in lines),
    ])


def run_demo(out: str | Path | None = None, cfg: TrainConfig | None = None, eval_limit: int | None = None,
             max_new_tokens: int = 48, progress: bool = True) -> dict[str, Any]:
    """Train the default patch and compare base vs patched; writes DIR/patch and DIR/summary.json."""
    from ..data.readers import write_jsonl_atomic
    from ..modeling import load_model
    from ..patches import record_evaluation
    from .train import check_run_dir, train

    cfg = cfg or TrainConfig()
    cfg.validate()
    if eval_limit is not None and (isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1):
        raise ConfigError(f"--eval-limit must be an integer >= 1 (or unset for every test prompt), got {eval_limit!r}")
    out = Path(out) if out else default_out_dir()
    check_run_dir(cfg, out, resume=False)  # before the model loads
    t0 = time.time()
    model, tok = load_model(cfg.model, chat_template=cfg.chat_template)
    result = train(cfg, out, model_and_tok=(model, tok), progress=progress)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=64)
    results: dict[str, Any] = {}
    all_rows = []
    for name in ("harmful", "benign"):
        records = builtin_split(name, "test")[: eval_limit or None]
        rows = generate_and_judge(result.model, tok, records, ["base", "patched"], DEFAULT_JUDGES, gen,
                                  progress=progress)
        for r in rows:
            r["set"] = name
        all_rows += rows
        results[name] = summarize(rows, DEFAULT_JUDGES, group_by="kind" if name == "benign" else None,
                                  harmful=name == "harmful")
        if name == "harmful":
            prefill_rows_, prefill = prefill_attack(result.model, tok, records, rows, gen, progress)
            all_rows += [{**r, "set": name} for r in prefill_rows_]
    write_jsonl_atomic(out / "samples.jsonl", all_rows)
    patch_bytes = (result.output_dir / "adapter_model.safetensors").stat().st_size
    summary = {
        "model": cfg.model, "patch": str(result.output_dir), "recipe": to_dict(cfg), "results": results,
        "patch_bytes": patch_bytes, "train_seconds": result.stats["train_seconds"],
        "total_seconds": round(time.time() - t0, 1), "training": result.stats,
        "primary_judge": PRIMARY_JUDGE, "eval_max_new_tokens": max_new_tokens, "prefill": prefill,
    }
    atomic_write_json(out / "summary.json", summary)
    for name in ("harmful", "benign"):
        record_evaluation(result.output_dir, {
            "suite": f"builtin:{name}:test", "judges": list(DEFAULT_JUDGES), "n": results[name]["base"]["n"],
            "max_new_tokens": max_new_tokens, "out": str(out),
            "refusal": {v: {j: results[name][v][j] for j in DEFAULT_JUDGES} for v in ("base", "patched")}})
    return summary


def prefill_attack(model: Any, tok: Any, records: list[Any], rows: list[dict[str, Any]], gen: GenerationConfig,
                   progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The demo's prefilling attack (`DEMO_PREFILL`) on the harmful records whose plain answers are `rows`
    (base, then patched, in record order): the prefilled rows and the summary block (`evals.prefill`)."""
    from ..evals.prefill import PrefillSpec, prefill_rows
    from ..judges import get_judge
    from ..modeling.backends import TransformersBackend

    plain = {v: [r for r in rows if r["model"] == v] for v in ("base", "patched")}
    return prefill_rows(TransformersBackend(model, tok), PrefillSpec(**DEMO_PREFILL), records, plain,
                        [get_judge(j) for j in DEFAULT_JUDGES], gen, "demo", progress)
