"""Refusal evaluation of base and patched models on a prompt file: the `safetypatch eval --prompts` contract.

Output files (other tools read them):
- `DIR/samples.jsonl`: one row per model and prompt: `model` ("base" | "patched"), `prompt`, `response`, and one
  boolean per judge named after it (`refusal_xstest`, `refusal_gcg`: True = refused), plus `index` and the prompt
  file's own id / category / label columns when present.
- `DIR/summary.json`: per model, the refusal rate under each judge, and patched - base differences.

With a prefill attack (`EvalRequest.prefill`, `--prefill` / `--prefill-text`; `evals.prefill`), every row has
`attack` (`prefill_k0` for the plain answers, `prefill_kK`, `opening_N`) and `prefill` (the prefilled text; the
judged `response` is the continuation only), and summary.json has a `prefill` block: the attacks, how many prompts
were attacked, and per model the refusal rate per attack and judge with the worst cases per prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GenerationConfig, to_dict
from ..data.builtin import resolve_prompts
from ..data.readers import Record
from ..errors import ConfigError
from ..io_utils import atomic_write_json, claim_output_dir
from ..judges import DEFAULT_JUDGES, get_judge
from ..modeling.backends import Backend, TransformersBackend
from .backend import BackendChoice, open_eval_backend
from .prefill import PrefillSpec, prefill_rows, source_texts

RESERVED = ("model", "prompt", "response", "index")


@dataclass
class EvalRequest:
    model: str = "default"
    patch: str | None = None
    with_base: bool = False
    prompts: str = "builtin:harmful:test"
    prompt_field: str = "prompt"
    judges: tuple[str, ...] = DEFAULT_JUDGES
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    limit: int | None = None
    chat_template: str = "auto"  # --chat-template: auto | plain | chatml | a Jinja file (data.templates)
    backend: BackendChoice = field(default_factory=BackendChoice)  # --backend transformers | vllm and its settings
    prefill: PrefillSpec | None = None  # --prefill / --prefill-text: the prefill attack as well (evals.prefill)


def load_prompt_file(spec: str, prompt_field: str = "prompt", limit: int | None = None) -> list[Record]:
    """Prompts from a JSONL file with a `prompt` field, a CSV with a `prompt` column, or 'builtin:<set>:<split>';
    the first `limit` of them (None: all; a limit below 1 is a ConfigError, never a Python slice from the end)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be an integer >= 1 (or None for every prompt), got {limit!r}")
    records = resolve_prompts(spec, prompt_field=prompt_field, response_field=None, default_split="test")
    return records[:limit] if limit else records


def generate_and_judge(model: Any, tok: Any, records: list[Record], variants: list[str], judges: tuple[str, ...],
                       gen: GenerationConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of the samples.jsonl contract for each variant ('base' / 'patched') of one loaded model."""
    return judged_rows(TransformersBackend(model, tok), records, variants, judges, gen, progress)


def judged_rows(backend: Backend, records: list[Record], variants: list[str], judges: tuple[str, ...],
                gen: GenerationConfig, progress: bool = True) -> list[dict[str, Any]]:
    """`generate_and_judge` through a backend: its answers for each variant, judged. With `progress`, bars
    "generating (VARIANT)" and "judging (VARIANT): JUDGES" (stderr)."""
    from tqdm.auto import tqdm

    judge_objs = [get_judge(j) for j in judges]
    rows: list[dict[str, Any]] = []
    for name in variants:
        gens = backend.generate([r.chat() for r in records], gen, variant=name, desc=f"generating ({name})",
                                progress=progress)
        judging = tqdm(list(zip(records, gens)), desc=f"judging ({name}): {', '.join(judges)}", leave=False,
                       disable=not progress or len(records) < 2)
        for i, (r, g) in enumerate(judging):
            row: dict[str, Any] = {"model": name, "prompt": r.prompt, "response": g.text}
            for j in judge_objs:
                row[j.name] = j.judge(r.prompt, g.text).refused
            row["index"] = i
            row.update({k: v for k, v in r.meta.items() if k not in RESERVED and k not in row})
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], judges: tuple[str, ...], group_by: str | None = None,
              harmful: bool | None = None) -> dict[str, Any]:
    """Refusal rate per model and judge (and per `group_by` value), and patched - base differences. For judges of
    whole-answer classes (`judges.whole_answer_judge(j, harmful)`; `harmful` None: unknown prompts, so only
    `refusal_whole`), also `refused_then_complied`: {judge: rate of RTC among the rows with a verdict}. The class
    comes from the row's `{judge}_label`; a keyword judge without one is asked again (cheap, no model), a model
    judge without one gets None."""
    from ..judges import JUDGES, ModelJudge, whole_answer_class, whole_answer_judge

    rtc_judges = [j for j in judges if whole_answer_judge(j, harmful)]

    def rtc_rate(mine: list[dict[str, Any]], j: str) -> float | None:
        judged = [r for r in mine if r.get(j) is not None]
        if all(f"{j}_label" in r for r in judged):
            labels = [r[f"{j}_label"] for r in judged]
        elif issubclass(JUDGES[j], ModelJudge):
            return None  # no labels kept; asking the judge model again is not a summary's job
        else:
            judge = JUDGES[j]()
            labels = [judge.judge(r["prompt"], r["response"]).label for r in judged]
        classes = [whole_answer_class(x) for x in labels]
        return classes.count("refused_then_complied") / len(classes) if classes else None

    out: dict[str, Any] = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        entry: dict[str, Any] = {"n": len(mine)}
        for j in judges:
            vals = [r[j] for r in mine if r.get(j) is not None]
            entry[j] = sum(vals) / len(vals) if vals else None
        if rtc_judges:
            entry["refused_then_complied"] = {j: rtc_rate(mine, j) for j in rtc_judges}
        if group_by:
            groups: dict[str, Any] = {}
            for g in sorted({str(r.get(group_by)) for r in mine}):
                sub = [r for r in mine if str(r.get(group_by)) == g]
                groups[g] = {"n": len(sub), **{j: sum(bool(r[j]) for r in sub) / len(sub) for j in judges}}
            entry[f"by_{group_by}"] = groups
        out[name] = entry
    if "base" in out and "patched" in out:
        out["difference"] = {j: (out["patched"][j] - out["base"][j]) for j in judges
                             if out["patched"][j] is not None and out["base"][j] is not None}
        if rtc_judges:
            b, p = out["base"]["refused_then_complied"], out["patched"]["refused_then_complied"]
            out["difference"]["refused_then_complied"] = {j: p[j] - b[j] for j in rtc_judges
                                                         if p[j] is not None and b[j] is not None}
    return out


def run_eval(req: EvalRequest, out_dir: str | Path, resume: bool = False,
             model_and_tok: tuple[Any, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate, judge and write samples.jsonl + summary.json; returns the summary (`progress`: bars on stderr).
    The answers come from `req.backend` (transformers: `model_and_tok` or the loaded --model; vllm: one engine)."""
    from ..data.readers import write_jsonl_atomic

    t0 = time.time()
    req.generation.validate("eval generation")
    records = load_prompt_file(req.prompts, req.prompt_field, req.limit)
    if req.prefill is not None:
        source_texts(req.prefill, records, "--prefill-source")  # a source without answers fails here, before any output
    for j in req.judges:
        get_judge(j)  # an unknown judge fails here, before the output directory or the model
    out = claim_output_dir(out_dir, resume=resume, marker="summary.json")
    load = (lambda: model_and_tok) if model_and_tok else None  # noqa: E731
    backend = open_eval_backend(req.backend, req.model, req.patch, req.chat_template, load=load)
    variants = ["base"]
    if req.patch:
        variants = (["base"] if req.with_base else []) + ["patched"]
    rows = judged_rows(backend, records, variants, tuple(req.judges), req.generation, progress)
    results = summarize(rows, tuple(req.judges))
    block = None
    if req.prefill is not None:
        plain = {v: [r for r in rows if r["model"] == v] for v in variants}
        extra, block = prefill_rows(backend, req.prefill, records, plain, [get_judge(j) for j in req.judges],
                                    req.generation, "--prefill-source", progress)
        for r in rows:
            r.update(attack="prefill_k0", prefill="")
        rows += extra
    write_jsonl_atomic(out / "samples.jsonl", rows)
    summary = {
        "model": req.model, "patch": req.patch, "prompts": req.prompts, "n_prompts": len(records),
        "judges": list(req.judges), "generation": to_dict(req.generation),
        "results": results, "seconds": round(time.time() - t0, 1),
    }
    if block is not None:
        summary["prefill"] = block
    atomic_write_json(out / "summary.json", summary)
    return summary
