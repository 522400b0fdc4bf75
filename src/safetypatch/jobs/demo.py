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


def default_out_dir() -> Path:
    return Path("runs") / f"demo-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def format_table(summary: dict[str, Any]) -> str:
    """One table: harmful refusal, benign refusal (ordinary / look-alike), patch size, training time."""
    res = summary["results"]
    rows = []
    for name in ("base", "patched"):
        h, b = res["harmful"][name], res["benign"][name]
        kinds = b.get("by_kind", {})
        rows.append([
            name,
            f"{h[PRIMARY_JUDGE]:.0%} / {h['refusal_gcg']:.0%}",
            f"{b[PRIMARY_JUDGE]:.0%} / {b['refusal_gcg']:.0%}",
            " / ".join(f"{kinds[k][PRIMARY_JUDGE]:.0%}" for k in ("ordinary", "lookalike") if k in kinds) or "-",
            f"{summary['patch_bytes'] / 1024:.1f} KB" if name == "patched" else "-",
            f"{summary['train_seconds']:.0f} s" if name == "patched" else "-",
        ])
    head = ["model", "harmful refusal", "benign refusal", "ordinary / look-alike", "patch size", "training time"]
    lines = render_table(head, rows).splitlines()
    width = len(lines[1])  # the dashed rule spans the table; rows keep their padding to it, as the table always had
    n_h, n_b = res["harmful"]["base"]["n"], res["benign"]["base"]["n"]
    return "\n".join([
        f"Built-in test splits: {n_h} harmful, {n_b} benign prompts; refusal by keyword judges (XSTest / GCG).",
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
        results[name] = summarize(rows, DEFAULT_JUDGES, group_by="kind" if name == "benign" else None)
    write_jsonl_atomic(out / "samples.jsonl", all_rows)
    patch_bytes = (result.output_dir / "adapter_model.safetensors").stat().st_size
    summary = {
        "model": cfg.model, "patch": str(result.output_dir), "recipe": to_dict(cfg), "results": results,
        "patch_bytes": patch_bytes, "train_seconds": result.stats["train_seconds"],
        "total_seconds": round(time.time() - t0, 1), "training": result.stats,
        "primary_judge": PRIMARY_JUDGE, "eval_max_new_tokens": max_new_tokens,
    }
    atomic_write_json(out / "summary.json", summary)
    for name in ("harmful", "benign"):
        record_evaluation(result.output_dir, {
            "suite": f"builtin:{name}:test", "judges": list(DEFAULT_JUDGES), "n": results[name]["base"]["n"],
            "max_new_tokens": max_new_tokens, "out": str(out),
            "refusal": {v: {j: results[name][v][j] for j in DEFAULT_JUDGES} for v in ("base", "patched")}})
    return summary
