"""The cases of benchmarks/bad_inputs.py, by kind: numbers, files, patches (integrity and shape), names, outputs
(in the way, races, crashes), resume, text (encodings, huge prompts), flags. `all_cases()` lists them all.

argv placeholders: {model} the tiny model dir, {patch} / {patch2} fresh copies of two patches for it in the case's
directory {d}, {merged} the patch merged into the model, {harmful} / {benign} / {prompts} / {prompts_csv} data files
(12 refusal pairs, 8 benign prompts, 12 eval prompts), {suite} a tiny suite file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from bad_inputs import TRAIN_FLAGS, Case, Ctx, Run
from bad_inputs_crash import (certificate_writers, crash_everywhere, files_state, patch_state, race, reference,
                              resume_after_kill, sha256, stale_cleanup)

DATA = ["--data", "{harmful}", "--benign", "{benign}", "--dev-harmful", "{harmful}", "--dev-benign", "{benign}"]
TRAIN = ["train", "--model", "{model}", *DATA, *TRAIN_FLAGS, "--out", "{d}/run"]
DEMO = ["demo", "--model", "{model}", *DATA, *TRAIN_FLAGS, "--out", "{d}/demo"]
EVAL = ["eval", "--model", "{model}", "--patch", "{patch}", "--prompts", "{prompts}", "--out", "{d}/ev",
        "--max-new-tokens", "2"]
SUITE = ["eval", "--model", "{model}", "--patch", "{patch}", "--suite", "{suite}", "--out", "{d}/ev",
         "--db", "{d}/results.db"]
CAL = ["calibrate", "--model", "{model}", "--patch", "{patch}", "--factors", "0,1", "--dev-harmful", "{harmful}",
       "--dev-benign", "{benign}", "--max-new-tokens", "2"]
RED = ["redteam", "--model", "{model}", "--patch", "{patch}", "--pool", "{harmful}", "--benign-dev", "{benign}",
       "--out", "{d}/rt", "--rounds", "1", "--attacks", "aim", "--max-new-tokens", "2", "--min-refusals", "4"]
ANALYZE = ["analyze", "--model", "{model}", "--patch", "{patch}", "--k", "1,2", "--limit", "2"]
CHAT = ["chat", "--model", "{model}", "--patch", "{patch}", "--max-new-tokens", "2"]
SCALE = ["patch", "scale", "{patch}", "-o", "{d}/out"]
STACK = ["patch", "stack", "{patch}", "{patch2}", "-o", "{d}/out"]
MERGE = ["patch", "merge", "--model", "{model}", "{patch}", "-o", "{d}/out"]
EXPORT = ["patch", "export", "{patch}", "--format", "peft", "-o", "{d}/out"]
GGUF = ["patch", "export", "{patch}", "--format", "gguf", "--model", "{model}", "-o", "{d}/out.gguf"]
PROJECT = ["patch", "project", "{patch}", "--model", "{model}", "-o", "{d}/out"]


def E(id: str, command: str, argv: list[str], names: Any, note: str, **kw: Any) -> Case:
    """A bad input: a clear error naming `names` (one substring or a tuple of alternatives) is expected."""
    return Case(id=id, command=command, argv=argv, names=(names,) if isinstance(names, str) else names, note=note,
                **kw)


def OK(id: str, command: str, argv: list[str], check: Callable[[Ctx, Run], str | None], note: str,
       **kw: Any) -> Case:
    """A legitimate (if unusual) input: exit 0 with a result `check` accepts."""
    return Case(id=id, command=command, argv=argv, expect="ok", check=check, note=note, **kw)


def EITHER(id: str, command: str, argv: list[str], names: Any, check: Callable[[Ctx, Run], str | None], note: str,
           **kw: Any) -> Case:
    """Either a clear error naming `names`, or exit 0 with a result `check` accepts."""
    return Case(id=id, command=command, argv=argv, expect="either", check=check,
                names=(names,) if isinstance(names, str) else names, note=note, **kw)


# ------------------------------------------------------------------------------------------------ file helpers
def write(rel: str, data: str | bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        p = ctx.d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def mkdir(rel: str) -> Callable[[Ctx], None]:
    return lambda ctx: (ctx.d / rel).mkdir(parents=True, exist_ok=True)


def both(*setups: Callable[[Ctx], Any]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        for s in setups:
            s(ctx)
    return setup


def truncate(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        p = ctx.d / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return setup


def flip_last_byte(rel: str) -> Callable[[Ctx], None]:
    """Edit one byte of the tensor data (the end of the file), so the file still parses."""
    def setup(ctx: Ctx) -> None:
        p = ctx.d / rel
        b = bytearray(p.read_bytes())
        b[-3] ^= 0x01
        p.write_bytes(bytes(b))
    return setup


def set_json(rel: str, obj: Any) -> Callable[[Ctx], None]:
    return write(rel, json.dumps(obj))


def edit_json(rel: str, fn: Callable[[Any], Any]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        p = ctx.d / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return setup


def remove(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        p = ctx.d / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def snapshot_of(ctx: Ctx, rel: str) -> dict[str, str]:
    p = ctx.d / rel
    if p.is_file():
        return {"": sha256(p)}
    return {str(f.relative_to(p)): sha256(f) for f in sorted(p.rglob("*")) if f.is_file()} if p.exists() else {}


def snapshot(rel: str) -> Callable[[Ctx], None]:
    """Remember the output at `rel` (set up before), for `unchanged(rel)`."""
    def setup(ctx: Ctx) -> None:
        (ctx.d / ".snapshot.json").write_text(json.dumps(snapshot_of(ctx, rel)))
    return setup


def unchanged(rel: str) -> Callable[[Ctx], str | None]:
    def kept(ctx: Ctx) -> str | None:
        before = json.loads((ctx.d / ".snapshot.json").read_text())
        now = snapshot_of(ctx, rel)
        if not now:
            return f"{rel} is gone"
        return None if now == before else f"{rel} was replaced or changed without --overwrite"
    return kept


def in_the_way(rel: str, kind: str = "dir") -> Callable[[Ctx], None]:
    """An existing output at `rel`: a copy of the patch (dir) or a small file, remembered by `snapshot`."""
    def make(ctx: Ctx) -> None:
        p = ctx.d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            shutil.copytree(ctx.d / "patch2", p)
        else:
            p.write_text("precious results\n")
    return both(make, snapshot(rel))


# ------------------------------------------------------------------------------------------------ checks
def n_evaluated(want: int, asked: str = "") -> Callable[[Ctx, Run], str | None]:
    """None when `eval` evaluated `want` prompts (summary.json's n_prompts); else how many, for `asked`."""
    def check(ctx: Ctx, run: Run) -> str | None:
        try:
            n = json.loads((ctx.d / "ev" / "summary.json").read_text())["n_prompts"]
        except (OSError, KeyError, ValueError) as e:
            return f"no readable summary.json ({e})"
        return None if n == want else f"evaluated {n} prompts{asked or f' of {want}'}"
    return check


def finite(rel: str) -> Callable[[Ctx, Run], str | None]:
    """None when the adapter weights at `rel` are all finite, else how many are not."""
    def check(ctx: Ctx, run: Run) -> str | None:
        import torch
        from safetensors.torch import load_file

        p = ctx.d / rel
        f = p / "adapter_model.safetensors" if p.is_dir() else p
        if not f.exists():
            return f"no {rel} written"
        bad = sum(int((~torch.isfinite(t.float())).sum()) for t in load_file(str(f)).values())
        return f"wrote {bad} non-finite weight(s) (NaN / inf) into {rel}" if bad else None
    return check


def exists(rel: str) -> Callable[[Ctx, Run], str | None]:
    return lambda ctx, run: None if (ctx.d / rel).exists() else f"no {rel}"


def says(*words: str) -> Callable[[Ctx, Run], str | None]:
    """None when the output (stdout or stderr) mentions one of `words`."""
    def check(ctx: Ctx, run: Run) -> str | None:
        text = (run.out + run.err).lower()
        return None if any(w.lower() in text for w in words) else f"the output does not mention {' / '.join(words)}"
    return check


def all_of(*checks: Callable[[Ctx, Run], str | None]) -> Callable[[Ctx, Run], str | None]:
    def check(ctx: Ctx, run: Run) -> str | None:
        return next((r for r in (c(ctx, run) for c in checks) if r), None)
    return check


def nothing(ctx: Ctx, run: Run) -> str | None:
    return None


def scaled_by(factor: float) -> Callable[[Ctx, Run], str | None]:
    """The output patch's lora_B equals the input's times `factor` (both finite)."""
    def check(ctx: Ctx, run: Run) -> str | None:
        import torch

        from safetypatch.patches.ops import delta_weights

        if (r := finite("out")(ctx, run)):
            return r
        a, b = delta_weights(ctx.d / "patch"), delta_weights(ctx.d / "out")
        ok = all(torch.allclose(b[m], factor * a[m], atol=1e-3, rtol=1e-2) for m in a)
        return None if ok else f"the written update is not {factor:g} x the input's"
    return check


def db_has_run(ctx: Ctx, run: Run) -> str | None:
    import sqlite3

    p = ctx.d / "results.db"
    if not p.exists():
        return "--db was ignored: no results database written"
    with sqlite3.connect(p) as con:
        n = con.execute("select count(*) from runs").fetchone()[0]
    return None if n else "--db was ignored: nothing recorded"


def no_certificate(ctx: Ctx, run: Run) -> str | None:
    meta = json.loads((ctx.d / "patch" / "patch.json").read_text())
    n = len(meta.get("evaluations", []))
    return f"and recorded it in the patch certificate ({n} entry)" if n else None


# ------------------------------------------------------------------------------------------------ cases
def number_cases() -> list[Case]:
    train = [("lr", "nan"), ("lr", "inf"), ("lr", "-1"), ("lr", "0"), ("lr", "abc"), ("epochs", "nan"),
             ("epochs", "inf"), ("epochs", "0"), ("epochs", "-1"), ("alpha", "nan"), ("alpha", "inf"), ("alpha", "0"),
             ("rank", "0"), ("rank", "-2"), ("rank", "1.5"), ("dropout", "1"), ("dropout", "nan"),
             ("batch-size", "0"), ("grad-accum", "0"), ("max-length", "0"), ("warmup-ratio", "nan"),
             ("warmup-ratio", "-0.5"), ("weight-decay", "nan"), ("benign-weight", "nan"), ("benign-weight", "-1"),
             ("decision-weight", "nan"), ("decision-tokens", "-1"), ("anchor-tokens", "0"), ("mix-ratio", "nan"),
             ("dev-size", "0"), ("dev-tokens", "0"), ("eval-every", "-1"), ("patience", "-1"),
             ("overlap-beta", "nan"), ("overlap-k", "0"), ("dev-penalty", "nan"), ("dev-tolerance", "nan"),
             ("prefix-cache-max-mb", "nan"), ("recovery", "nan"), ("recovery", "-1"), ("recovery-max-prefix", "0")]
    cases = [E(f"train-{f}-{v}", "train", [*TRAIN, f"--{f}", v], (f.replace("-", "_"), f"--{f}"),
               f"train --{f} {v}", check=finite("run/patch")) for f, v in train]
    cases += [
        E("eval-limit-neg", "eval --prompts", [*EVAL, "--limit", "-3"], "limit", "eval --limit -3 (12 prompts)",
          check=n_evaluated(-1, " of 12 for --limit -3")),
        E("eval-limit-zero", "eval --prompts", [*EVAL, "--limit", "0"], "limit", "eval --limit 0",
          check=n_evaluated(-1, " of 12 for --limit 0")),
        E("eval-max-new-tokens-zero", "eval --prompts", [*EVAL, "--max-new-tokens", "0"], "max_new_tokens",
          "eval --max-new-tokens 0 (empty answers)", check=no_certificate),
        E("eval-max-new-tokens-neg", "eval --prompts", [*EVAL, "--max-new-tokens", "-1"], "max_new_tokens",
          "eval --max-new-tokens -1", check=no_certificate),
        E("eval-batch-size-zero", "eval --prompts", [*EVAL, "--batch-size", "0"], "batch_size",
          "eval --batch-size 0"),
        E("eval-batch-size-neg", "eval --prompts", [*EVAL, "--batch-size", "-2"], "batch_size",
          "eval --batch-size -2"),
        E("eval-limit-text", "eval --prompts", [*EVAL, "--limit", "ten"], "--limit", "eval --limit ten"),
        OK("eval-limit-large", "eval --prompts", [*EVAL, "--limit", "100"], n_evaluated(12),
           "eval --limit 100 on 12 prompts: all 12"),
        E("suite-limit-neg", "eval --suite", [*SUITE, "--limit", "-1"], "limit", "eval --suite --limit -1"),
        E("suite-limit-zero", "eval --suite", [*SUITE, "--limit", "0"], "limit", "eval --suite --limit 0"),
        E("suite-max-new-tokens-zero", "eval --suite", [*SUITE, "--max-new-tokens", "0"], "max_new_tokens",
          "eval --suite --max-new-tokens 0"),
        E("suite-batch-size-zero", "eval --suite", [*SUITE, "--batch-size", "0"], "batch_size",
          "eval --suite --batch-size 0"),
    ]
    return cases + patch_number_cases() + command_number_cases()


def patch_number_cases() -> list[Case]:
    scale = [E(f"scale-factor-{v}", "patch scale", [*SCALE, f"--factor={v}"], ("factor", "finite"),
               f"patch scale --factor {v}", check=finite("out")) for v in ("nan", "inf", "-inf")]
    stack = [E(f"stack-weights-{v.replace(',', '_')}", "patch stack", [*STACK, f"--weights={v}"], ("weights", "finite"),
               f"patch stack --weights {v}", check=finite("out")) for v in ("nan,1", "inf,1")]
    # a huge factor: refused, or a result that is finite in the patch's storage dtype (float16 overflows at 65504)
    huge = [EITHER(f"scale-factor-{v}", "patch scale", [*SCALE, f"--factor={v}"], ("factor", "finite", "range"),
                   finite("out"), f"patch scale --factor {v} (refused, or a finite result)") for v in ("1e10", "1e39")]
    huge.append(EITHER("stack-weights-1e10_1", "patch stack", [*STACK, "--weights=1e10,1"], ("weights", "finite"),
                       finite("out"), "patch stack --weights 1e10,1 (refused, or a finite result)"))
    return scale + stack + huge + [
        E("scale-factor-text", "patch scale", [*SCALE, "--factor", "half"], "--factor", "patch scale --factor half"),
        OK("scale-factor-minus-one", "patch scale", [*SCALE, "--factor=-1"], scaled_by(-1.0),
           "patch scale --factor -1 (invert): legitimate"),
        EITHER("scale-factor-zero", "patch scale", [*SCALE, "--factor", "0"], "factor", scaled_by(0.0),
               "patch scale --factor 0: a zero patch, or refused"),
        E("stack-weights-count", "patch stack", [*STACK, "--weights", "1"], "weights", "patch stack, 1 weight for 2"),
        E("stack-weights-text", "patch stack", [*STACK, "--weights", "a,b"], "weights", "patch stack --weights a,b"),
        OK("stack-weights-negative", "patch stack", [*STACK, "--weights=-1,1"], finite("out"),
           "patch stack --weights=-1,1: legitimate"),
        E("export-max-lora-rank-zero", "patch export", [*EXPORT, "--max-lora-rank", "0"], "max_lora_rank",
          "patch export --max-lora-rank 0"),
        E("export-max-lora-rank-neg", "patch export", [*EXPORT, "--max-lora-rank", "-1"], "max_lora_rank",
          "patch export --max-lora-rank -1"),
        E("gguf-n-head-zero", "patch export", [*GGUF, "--n-head", "0"], "n_head", "patch export gguf --n-head 0"),
        E("gguf-n-head-neg", "patch export", [*GGUF, "--n-head", "-4"], "n_head", "patch export gguf --n-head -4"),
        E("gguf-n-head-kv-zero", "patch export", [*GGUF, "--n-head", "4", "--n-head-kv", "0"], "n_head_kv",
          "patch export gguf --n-head-kv 0"),
        E("project-k-zero", "patch project", [*PROJECT, "--k", "0"], "k", "patch project --k 0",
          check=finite("out")),
        E("project-k-neg", "patch project", [*PROJECT, "--k", "-1"], "k", "patch project --k -1",
          check=finite("out")),
        EITHER("project-k-huge", "patch project", [*PROJECT, "--k", "100000"], "k", finite("out"),
               "patch project --k 100000 (more than the dimensions)"),
    ]


def command_number_cases() -> list[Case]:
    return [
        E("analyze-k-text", "analyze", [*ANALYZE, "--k", "nan"], "--k", "analyze --k nan"),
        E("analyze-k-zero", "analyze", [*ANALYZE, "--k", "0"], "--k", "analyze --k 0"),
        E("analyze-limit-zero", "analyze", [*ANALYZE, "--limit", "0"], "limit", "analyze --limit 0"),
        E("analyze-limit-neg", "analyze", [*ANALYZE, "--limit", "-1"], "limit", "analyze --limit -1"),
        EITHER("analyze-k-huge", "analyze", [*ANALYZE, "--k", "100000"], "k", nothing, "analyze --k 100000"),
        E("calibrate-factors-nan", "calibrate", [*CAL, "--factors", "nan,1"], "factors", "calibrate --factors nan,1"),
        E("calibrate-factors-inf", "calibrate", [*CAL, "--factors", "1,inf"], "factors", "calibrate --factors 1,inf"),
        E("calibrate-factors-empty", "calibrate", [*CAL, "--factors", ","], "factors", "calibrate --factors ,"),
        E("calibrate-budget-nan", "calibrate", [*CAL, "--max-over-refusal", "nan"], "max_over_refusal",
          "calibrate --max-over-refusal nan"),
        E("calibrate-budget-neg", "calibrate", [*CAL, "--max-over-refusal", "-1"], "max_over_refusal",
          "calibrate --max-over-refusal -1"),
        E("calibrate-max-new-tokens-zero", "calibrate", [*CAL, "--max-new-tokens", "0"], "max_new_tokens",
          "calibrate --max-new-tokens 0", check=no_certificate),
        E("calibrate-batch-size-zero", "calibrate", [*CAL, "--batch-size", "0"], "batch_size",
          "calibrate --batch-size 0"),
        E("redteam-rounds-neg", "redteam", [*RED, "--rounds", "-1"], "rounds", "redteam --rounds -1"),
        E("redteam-holdout-every-one", "redteam", [*RED, "--holdout-every", "1"], "holdout_every",
          "redteam --holdout-every 1"),
        E("redteam-holdout-every-zero", "redteam", [*RED, "--holdout-every", "0"], "holdout_every",
          "redteam --holdout-every 0"),
        E("redteam-per-round-zero", "redteam", [*RED, "--per-round", "0"], "per_round", "redteam --per-round 0"),
        E("redteam-epochs-nan", "redteam", [*RED, "--epochs", "nan"], "epochs", "redteam --epochs nan"),
        E("redteam-max-new-tokens-zero", "redteam", [*RED, "--max-new-tokens", "0"], "max_new_tokens",
          "redteam --max-new-tokens 0"),
        E("redteam-min-refusals-neg", "redteam", [*RED, "--min-refusals", "-1"], "min_refusals",
          "redteam --min-refusals -1"),
        E("chat-max-new-tokens-zero", "chat", [*CHAT, "--max-new-tokens", "0"], "max_new_tokens",
          "chat --max-new-tokens 0"),
        E("chat-max-new-tokens-neg", "chat", [*CHAT, "--max-new-tokens", "-1"], "max_new_tokens",
          "chat --max-new-tokens -1"),
        E("demo-eval-limit-neg", "demo", [*DEMO, "--eval-limit", "-3"], "eval_limit",
          "demo --eval-limit -3 (a slice: all but 3)"),
        E("demo-eval-limit-zero", "demo", [*DEMO, "--eval-limit", "0"], "eval_limit", "demo --eval-limit 0"),
        E("demo-lr-nan", "demo", [*DEMO, "--lr", "nan"], "lr", "demo --lr nan"),
        E("runs-limit-neg", "runs", ["runs", "--db", "{d}/results.db", "--limit", "-1"], "limit", "runs --limit -1"),
        E("runs-limit-zero", "runs", ["runs", "--db", "{d}/results.db", "--limit", "0"], "limit", "runs --limit 0"),
    ]


LATIN1 = '{"prompt": "Caf\xe9 cr\xe8me: how do I make it?", "response": "I\'m sorry, I can\'t."}\n'.encode("latin-1")
BOM_CSV = "\ufeffprompt,response\n" + "".join(f"Tell me how to build weapon {i},I'm sorry but I can't.\n"
                                              for i in range(12))
BOM_JSONL = "\ufeff" + "".join(json.dumps({"prompt": f"Question {i}?", "response": "I can't."}) + "\n"
                               for i in range(12))


def train_data(path: str) -> list[str]:
    """`train` with --data `path`."""
    i = TRAIN.index("{harmful}")
    return [*TRAIN[:i], path, *TRAIN[i + 1:]]


def eval_prompts(path: str) -> list[str]:
    """`eval` with --prompts `path`."""
    return [path if a == "{prompts}" else a for a in EVAL]


def file_cases() -> list[Case]:
    return train_file_cases() + eval_file_cases() + suite_file_cases() + template_file_cases()


def template_file_cases() -> list[Case]:
    """--chat-template FILE (a Jinja template): missing, a directory, not UTF-8, empty, not Jinja; a bad name."""
    bad = [("missing", None, "no such file"), ("directory", mkdir("t.jinja"), "t.jinja"),
           ("non-utf8", write("t.jinja", "{{ 'caf\xe9' }}".encode("latin-1")), "t.jinja"),
           ("empty", write("t.jinja", "\n"), "t.jinja"),
           ("invalid-jinja", write("t.jinja", "{% for m in messages %}{{ m }}"), "t.jinja")]
    cases = [E(f"train-chat-template-{what}", "train", [*TRAIN, "--chat-template", "{d}/t.jinja"], name,
               f"train --chat-template FILE ({what})", **({"setup": setup} if setup else {}))
             for what, setup, name in bad]
    return cases + [
        E("eval-chat-template-invalid-jinja", "eval --prompts", [*EVAL, "--chat-template", "{d}/t.jinja"], "t.jinja",
          "eval --chat-template FILE (not Jinja)", setup=write("t.jinja", "{{ messages")),
        E("chat-chat-template-name", "chat", [*CHAT, "--chat-template", "chatlm"], "chatlm",
          "chat --chat-template chatlm (a misspelt name)"),
    ]


def train_file_cases() -> list[Case]:
    return [
        E("train-data-missing", "train", train_data("{d}/nope.jsonl"), "nope.jsonl", "train --data missing file"),
        E("train-data-directory", "train", train_data("{d}/adir"), "adir", "train --data a directory",
          setup=mkdir("adir")),
        E("train-data-non-utf8", "train", train_data("{d}/latin1.jsonl"), "latin1.jsonl",
          "train --data a Latin-1 JSONL", setup=write("latin1.jsonl", LATIN1)),
        E("train-data-utf16", "train", train_data("{d}/u16.jsonl"), "u16.jsonl", "train --data a UTF-16 JSONL",
          setup=write("u16.jsonl", BOM_JSONL.encode("utf-16"))),
        E("train-data-empty", "train", train_data("{d}/empty.jsonl"), "empty.jsonl", "train --data an empty file",
          setup=write("empty.jsonl", "")),
        E("train-data-txt", "train", train_data("{d}/data.txt"), "data.txt", "train --data a .txt file",
          setup=write("data.txt", "hello\n")),
        E("train-data-json-shape", "train", train_data("{d}/d.json"), "d.json", "train --data JSON of the wrong shape",
          setup=write("d.json", '{"a": 1, "b": 2}')),
        E("train-data-rows-not-objects", "train", train_data("{d}/d.jsonl"), "d.jsonl", "train --data rows that are "
          "numbers", setup=write("d.jsonl", "1\n2\n")),
        E("train-data-no-response", "train", train_data("{prompts}"), "response",
          "train --data without a response column"),
        E("train-data-hub-lookalike", "train", train_data("data/nope"), "data/nope", "train --data data/nope (a "
          "missing local path shaped like org/name)", setup=mkdir("data"), max_seconds=10),
        OK("train-data-bom-csv", "train", train_data("{d}/bom.csv"), finite("run/patch"), "train --data a CSV "
           "with a UTF-8 BOM", setup=write("bom.csv", BOM_CSV)),
        OK("train-data-bom-jsonl", "train", train_data("{d}/bom.jsonl"), finite("run/patch"),
           "train --data a JSONL with a UTF-8 BOM", setup=write("bom.jsonl", BOM_JSONL)),
        E("train-benign-missing", "train", [*TRAIN, "--benign", "{d}/nob.jsonl"], "nob.jsonl",
          "train --benign missing file"),
        E("train-benign-non-utf8", "train", [*TRAIN, "--benign", "{d}/latin1.jsonl"], "latin1.jsonl",
          "train --benign a Latin-1 file", setup=write("latin1.jsonl", LATIN1)),
        E("train-mix-missing", "train", [*TRAIN, "--mix", "{d}/nomix.jsonl", "--mix-ratio", "0.2"], "nomix.jsonl",
          "train --mix missing file"),
        E("train-dev-harmful-missing", "train", [*TRAIN, "--dev-harmful", "{d}/nodev.jsonl"], "nodev.jsonl",
          "train --dev-harmful missing file"),
        E("train-config-missing", "train", [*TRAIN, "--config", "{d}/no.yaml"], "no.yaml", "train --config missing"),
        E("train-config-not-yaml", "train", [*TRAIN, "--config", "{d}/r.yaml"], "r.yaml", "train --config not YAML",
          setup=write("r.yaml", "lr: [1, 2\n")),
        E("train-config-list", "train", [*TRAIN, "--config", "{d}/r.yaml"], "r.yaml", "train --config a YAML list",
          setup=write("r.yaml", "- lr: 1\n")),
        E("train-config-non-utf8", "train", [*TRAIN, "--config", "{d}/r.yaml"], "r.yaml",
          "train --config a Latin-1 YAML", setup=write("r.yaml", "seed: 1 # caf\xe9\n".encode("latin-1"))),
        E("train-config-unknown-field", "train", [*TRAIN, "--config", "{d}/r.yaml"], "colour",
          "train --config with an unknown field", setup=write("r.yaml", "colour: red\n")),
        E("train-config-nan", "train", [*TRAIN, "--config", "{d}/r.yaml"], "lr", "train --config with lr: .nan",
          setup=write("r.yaml", "lr: .nan\n"), check=finite("run/patch")),
        OK("train-config-bom", "train", [*TRAIN, "--config", "{d}/r.yaml"], finite("run/patch"),
           "train --config a YAML with a UTF-8 BOM", setup=write("r.yaml", "\ufeffseed: 0\n")),
    ]


def eval_file_cases() -> list[Case]:
    return [
        E("eval-prompts-missing", "eval --prompts", eval_prompts("{d}/nope.jsonl"), "nope.jsonl",
          "eval --prompts missing file"),
        E("eval-prompts-directory", "eval --prompts", eval_prompts("{d}/adir"), "adir", "eval --prompts a directory",
          setup=mkdir("adir")),
        E("eval-prompts-non-utf8", "eval --prompts", eval_prompts("{d}/latin1.jsonl"), "latin1.jsonl",
          "eval --prompts a Latin-1 JSONL", setup=write("latin1.jsonl", LATIN1)),
        E("eval-prompts-non-utf8-csv", "eval --prompts", eval_prompts("{d}/latin1.csv"), "latin1.csv",
          "eval --prompts a Latin-1 CSV", setup=write("latin1.csv", "prompt\nCaf\xe9?\n".encode("latin-1"))),
        OK("eval-prompts-bom-csv", "eval --prompts", eval_prompts("{d}/bom.csv"), n_evaluated(12),
           "eval --prompts a CSV with a UTF-8 BOM", setup=write("bom.csv", BOM_CSV)),
        OK("eval-prompts-bom-jsonl", "eval --prompts", eval_prompts("{d}/bom.jsonl"), n_evaluated(12),
           "eval --prompts a JSONL with a UTF-8 BOM", setup=write("bom.jsonl", BOM_JSONL)),
        E("eval-prompts-empty", "eval --prompts", eval_prompts("{d}/empty.jsonl"), "empty.jsonl",
          "eval --prompts an empty file", setup=write("empty.jsonl", "")),
        E("eval-prompts-json-shape", "eval --prompts", eval_prompts("{d}/p.json"), "p.json",
          "eval --prompts JSON of the wrong shape", setup=write("p.json", '"just a string"')),
        E("eval-prompt-field", "eval --prompts", [*EVAL, "--prompt-field", "question"], "question",
          "eval --prompt-field naming no column"),
        E("eval-prompts-builtin-set", "eval --prompts", eval_prompts("builtin:nosuch:test"), "nosuch",
          "eval --prompts builtin:nosuch:test"),
        E("eval-prompts-builtin-split", "eval --prompts", eval_prompts("builtin:harmful:nosplit"), "nosplit",
          "eval --prompts builtin:harmful:nosplit"),
        E("eval-model-missing", "eval --prompts", [*EVAL[:2], "{d}/nomodel", *EVAL[3:]], "nomodel",
          "eval --model a missing directory", max_seconds=10),
        E("eval-model-hub-lookalike", "eval --prompts", [*EVAL[:2], "models/tiny", *EVAL[3:]], "models/tiny",
          "eval --model models/tiny (missing, shaped like org/name)", setup=mkdir("models"), max_seconds=10),
        E("eval-model-file", "eval --prompts", [*EVAL[:2], "{harmful}", *EVAL[3:]], "harmful.jsonl",
          "eval --model a data file"),
        E("eval-model-no-config", "eval --prompts", [*EVAL[:2], "{d}/m", *EVAL[3:]], ("config", "{d}/m"),
          "eval --model a directory without config.json",
          setup=lambda ctx: (shutil.copytree(ctx.model, ctx.d / "m"), (ctx.d / "m" / "config.json").unlink())),
        E("merge-model-missing", "patch merge", [*MERGE[:3], "{d}/nomodel", *MERGE[4:]], "nomodel",
          "patch merge --model a missing directory"),
        E("analyze-finetuned-missing", "analyze", ["analyze", "--model", "{model}", "--finetuned", "{d}/noft"],
          "noft", "analyze --finetuned a missing directory", forbid=("--model",)),
        E("runs-db-directory", "runs", ["runs", "--db", "{d}/adir"], "adir", "runs --db a directory",
          setup=mkdir("adir")),
        E("runs-db-garbage", "runs", ["runs", "--db", "{d}/r.db"], "r.db", "runs --db a file that is not SQLite",
          setup=write("r.db", b"\x00garbage" * 200)),
        E("compare-db-missing", "compare", ["compare", "1", "2", "--db", "{d}/none.db"], ("none.db", "run"),
          "compare two runs in a database that does not exist"),
    ]


def suite_file_cases() -> list[Case]:
    def suite(body: str | bytes) -> Callable[[Ctx], None]:
        return write("s.yaml", body)

    sv = [a if a != "{suite}" else "{d}/s.yaml" for a in SUITE]
    entry = "entries:\n  - {benchmark: builtin_harmful, limit: 3}\n"
    return [
        E("suite-unknown-name", "eval --suite", [*SUITE[:6], "nosuch_suite", *SUITE[7:]], "nosuch_suite",
          "eval --suite nosuch_suite"),
        E("suite-directory", "eval --suite", [*SUITE[:6], "{d}", *SUITE[7:]], "{d}", "eval --suite a directory"),
        E("suite-yaml-limit-neg", "eval --suite", sv, "limit", "suite entry limit: -2",
          setup=suite("entries:\n  - {benchmark: builtin_harmful, limit: -2}\n")),
        E("suite-yaml-limit-nan", "eval --suite", sv, "limit", "suite entry limit: .nan",
          setup=suite("entries:\n  - {benchmark: builtin_harmful, limit: .nan}\n")),
        E("suite-yaml-max-new-tokens-zero", "eval --suite", sv, "max_new_tokens", "suite generation max_new_tokens: 0",
          setup=suite("generation: {max_new_tokens: 0}\n" + entry)),
        E("suite-yaml-batch-size-neg", "eval --suite", sv, "batch_size", "suite generation batch_size: -1",
          setup=suite("generation: {batch_size: -1}\n" + entry)),
        E("suite-yaml-max-new-tokens-inf", "eval --suite", sv, "max_new_tokens",
          "suite generation max_new_tokens: .inf", setup=suite("generation: {max_new_tokens: .inf}\n" + entry)),
        E("suite-yaml-benchmark", "eval --suite", sv, "nosuch", "suite entry with an unknown benchmark",
          setup=suite("entries:\n  - {benchmark: nosuch}\n")),
        E("suite-yaml-attack", "eval --suite", sv, "zap", "suite entry with an unknown attack",
          setup=suite("entries:\n  - {benchmark: builtin_harmful, limit: 2, attacks: [none, zap]}\n")),
        E("suite-yaml-judge", "eval --suite", sv, "no_such_judge", "suite entry with an unknown judge",
          setup=suite("entries:\n  - {benchmark: builtin_harmful, limit: 2, judges: [no_such_judge]}\n")),
        E("suite-yaml-empty", "eval --suite", sv, "s.yaml", "an empty suite file", setup=suite("")),
        E("suite-yaml-list", "eval --suite", sv, "s.yaml", "a suite file holding a list", setup=suite("- 1\n- 2\n")),
        E("suite-yaml-invalid", "eval --suite", sv, "s.yaml", "a suite file that is not YAML",
          setup=suite("entries: [\n")),
        E("suite-yaml-non-utf8", "eval --suite", sv, "s.yaml", "a Latin-1 suite file",
          setup=suite(("name: caf\xe9\n" + entry).encode("latin-1"))),
        OK("suite-yaml-bom", "eval --suite", sv, exists("ev/summary.json"), "a suite file with a UTF-8 BOM",
           setup=suite("\ufeffname: tiny\ngeneration: {max_new_tokens: 2}\n" + entry)),
    ]


def patch_cases() -> list[Case]:
    """Damaged, edited, pickle-carrying and wrongly shaped patches, across the commands that read one."""
    readers = {"info": ["patch", "info", "{patch}"], "eval": EVAL, "scale": [*SCALE, "--factor", "2"],
               "stack": STACK, "merge": MERGE, "export": EXPORT, "analyze": ANALYZE, "calibrate": CAL,
               "project": PROJECT, "chat": CHAT}
    w = "patch/adapter_model.safetensors"
    damage = {
        "truncated": (truncate(w), ("adapter_model.safetensors", "sha256"), ("info", "eval", "scale", "merge",
                                                                               "export", "analyze")),
        "edited": (flip_last_byte(w), ("adapter_model.safetensors", "sha256"), ("info", "eval", "stack", "merge",
                                                                                "export", "analyze", "calibrate",
                                                                                "project", "chat")),
        "pickle": (write("patch/adapter_model.bin", b"\x80\x04pickle"), ("pickle", "adapter_model.bin"),
                   ("info", "eval", "scale", "analyze")),
        "no-weights": (remove(w), "adapter_model.safetensors", ("info", "eval")),
        "no-patch-json": (remove("patch/patch.json"), "patch.json", ("info", "eval", "scale")),
        "patch-json-damaged": (write("patch/patch.json", "{not json"), "patch.json", ("info", "scale", "merge")),
        "patch-json-list": (set_json("patch/patch.json", []), "patch.json", ("info", "eval", "scale", "export",
                                                                            "merge", "stack", "analyze")),
        "patch-json-weights-shape": (edit_json("patch/patch.json", lambda m: {**m, "weights": 3}), "patch.json",
                                     ("info", "eval", "scale")),
        "patch-json-base-shape": (edit_json("patch/patch.json", lambda m: {**m, "base_model": "x"}), "patch.json",
                                  ("info", "eval", "merge")),
        "patch-json-shape-shape": (edit_json("patch/patch.json", lambda m: {**m, "shape": "x"}), "patch.json",
                                   ("info", "stack")),
        "adapter-config-damaged": (write("patch/adapter_config.json", "{oops"), "adapter_config.json",
                                   ("eval", "merge", "scale", "export")),
        "adapter-config-rank": (edit_json("patch/adapter_config.json", lambda c: {**c, "r": 7}),
                                "adapter_config", ("eval", "scale")),
        "adapter-config-list": (set_json("patch/adapter_config.json", [1]), "adapter_config.json", ("eval", "scale")),
    }
    cases = []
    for what, (setup, names, commands) in damage.items():
        for c in commands:
            cases.append(E(f"{c}-{what}", f"patch {c}" if c in ("info", "scale", "stack", "merge", "export",
                                                                 "project") else c,
                           readers[c], names, f"{c} on a patch: {what.replace('-', ' ')}", setup=setup,
                           forbid=("--allow-unverified", "rank or shape mismatch"), kind="patch"))
    cases += [
        E("info-not-a-directory", "patch info", ["patch", "info", "{harmful}"], "harmful.jsonl",
          "patch info on a file"),
        E("info-missing", "patch info", ["patch", "info", "{d}/nopatch"], "nopatch", "patch info on a missing path"),
        E("info-empty-dir", "patch info", ["patch", "info", "{d}/adir"], "adir", "patch info on an empty directory",
          setup=mkdir("adir")),
        OK("info-no-verify", "patch info", ["patch", "info", "{patch}", "--no-verify"], says("not verified",
                                                                                            "unverified"),
           "patch info --no-verify on an edited patch: shown, and says it is unverified", setup=flip_last_byte(w)),
        E("eval-nan-patch", "eval --prompts", EVAL, ("finite", "nan"), "eval a patch whose weights are NaN (its "
          "sha256 recorded as if valid)", setup=nan_patch, check=no_certificate),
        OK("scale-permissions", "patch scale", [*SCALE, "--factor", "2"], umask_modes("out"),
           "patch scale: the output's modes follow the umask (not 0700 / 0600)"),
        OK("merge-permissions", "patch merge", MERGE, umask_modes("out"),
           "patch merge: the merged model's modes follow the umask"),
        E("eval-other-base", "eval --prompts", [*EVAL[:2], "{d}/other", *EVAL[3:]], ("another base", "fingerprint"),
          "eval a patch on another base model", setup=other_model),
    ]
    return cases


def nan_patch(ctx: Ctx) -> None:
    """lora_B all NaN, and patch.json's sha256 updated to match (as a patch written by an unchecked scale)."""
    import torch
    from safetensors.torch import load_file, save_file

    w = ctx.d / "patch" / "adapter_model.safetensors"
    tensors = {k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in load_file(str(w)).items()}
    save_file(tensors, str(w), metadata={"format": "pt"})
    meta = json.loads((ctx.d / "patch" / "patch.json").read_text())
    meta["weights"].update(sha256=sha256(w), bytes=w.stat().st_size)
    (ctx.d / "patch" / "patch.json").write_text(json.dumps(meta))


def umask_modes(rel: str) -> Callable[[Ctx, Run], str | None]:
    """None when the output directory and its files have the modes the umask gives (0755 / 0644 under 022)."""
    def check(ctx: Ctx, run: Run) -> str | None:
        import os

        mask = os.umask(0)
        os.umask(mask)
        out = ctx.d / rel
        bad = [f"{p.relative_to(ctx.d)} {oct(p.stat().st_mode & 0o777)}" for p in [out, *out.rglob("*")]
               if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask]
        return f"modes ignore the umask {oct(mask)}: {', '.join(bad[:3])}" if bad else None
    return check


def other_model(ctx: Ctx) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    build_tiny_model(tok, seed=1).save_pretrained(ctx.d / "other")
    tok.save_pretrained(ctx.d / "other")


def name_cases() -> list[Case]:
    train = [("target-modules", "nosuch_proj", "nosuch_proj"), ("layers", "5", "layers"), ("layers", "1-0", "layers"),
             ("layers", "abc", "layers"), ("method", "nope", "method"), ("init", "nope", "init"),
             ("schedule", "nope", "schedule"), ("save-dtype", "int8", "save_dtype"),
             ("overlap-side", "diagonal", "overlap_side"), ("model", "{d}/nomodel", "nomodel")]
    cases = [E(f"train-{f}-{v.replace('{d}/', '')}", "train", [*TRAIN, f"--{f}", v], n, f"train --{f} {v}")
             for f, v, n in train]
    return cases + [
        E("eval-judge-unknown", "eval --prompts", [*EVAL, "--judges", "nonsense"], "nonsense",
          "eval --judges nonsense"),
        E("eval-judge-one-unknown", "eval --prompts", [*EVAL, "--judges", "refusal_xstest,nonsense"], "nonsense",
          "eval --judges refusal_xstest,nonsense"),
        E("eval-judges-empty", "eval --prompts", [*EVAL, "--judges", ","], "judges", "eval --judges ,"),
        E("redteam-attack-unknown", "redteam", [*RED, "--attacks", "nosuch"], "nosuch", "redteam --attacks nosuch"),
        E("export-format", "patch export", [*EXPORT[:3], "--format", "onnx", *EXPORT[5:]], "--format",
          "patch export --format onnx"),
        E("project-side", "patch project", [*PROJECT, "--side", "diagonal"], "--side", "patch project --side diagonal"),
        E("suite-device", "eval --suite", [*SUITE, "--device", "gpu7"], ("device", "gpu7"), "eval --suite "
          "--device gpu7"),
        E("compare-variant", "compare", ["compare", "1", "2", "--variant", "both"], "--variant",
          "compare --variant both"),
    ]


def output_cases() -> list[Case]:
    return [
        E("stack-out-exists", "patch stack", STACK, ("out", "--overwrite"), "patch stack -o an existing patch",
          setup=in_the_way("out"), kept=unchanged("out")),
        E("scale-out-exists", "patch scale", [*SCALE, "--factor", "2"], ("out", "--overwrite"),
          "patch scale -o an existing patch", setup=in_the_way("out"), kept=unchanged("out")),
        E("merge-out-exists", "patch merge", MERGE, ("out", "--overwrite"), "patch merge -o an existing directory",
          setup=in_the_way("out"), kept=unchanged("out")),
        E("unmerge-out-exists", "patch unmerge", ["patch", "unmerge", "--model", "{merged}", "{patch}", "-o",
                                                  "{d}/out"], ("out", "--overwrite"),
          "patch unmerge -o an existing directory", setup=in_the_way("out"), kept=unchanged("out")),
        E("export-out-exists", "patch export", EXPORT, ("out", "--overwrite"), "patch export -o an existing directory",
          setup=in_the_way("out"), kept=unchanged("out")),
        E("gguf-out-exists", "patch export", GGUF, ("out.gguf", "--overwrite"), "patch export gguf -o an existing "
          "file", setup=in_the_way("out.gguf", "file"), kept=unchanged("out.gguf")),
        E("project-out-exists", "patch project", PROJECT, ("out", "--overwrite"), "patch project -o an existing "
          "patch", setup=in_the_way("out"), kept=unchanged("out")),
        E("stack-out-file", "patch stack", STACK, "out", "patch stack -o an existing file",
          setup=in_the_way("out", "file"), kept=unchanged("out")),
        E("calibrate-apply-out-exists", "calibrate", [*CAL, "-o", "{d}/out"], ("out", "--overwrite"),
          "calibrate --apply-out an existing patch", setup=in_the_way("out"), kept=unchanged("out")),
        E("calibrate-out-exists", "calibrate", [*CAL, "--out", "{d}/cal"], ("cal", "--overwrite"),
          "calibrate --out a directory holding calibration.json", setup=both(write("cal/calibration.json", "{}"),
                                                                              snapshot("cal")),
          kept=unchanged("cal")),
        E("eval-out-exists", "eval --prompts", EVAL, ("ev", "--resume"), "eval --out a directory holding results",
          setup=both(write("ev/summary.json", '{"n_prompts": 1}'), snapshot("ev")), kept=unchanged("ev")),
        E("eval-out-file", "eval --prompts", EVAL, "ev", "eval --out an existing file", setup=in_the_way("ev", "file"),
          kept=unchanged("ev")),
        E("train-out-file", "train", TRAIN, "run", "train --out an existing file", setup=in_the_way("run", "file"),
          kept=unchanged("run")),
        E("train-out-finished", "train", TRAIN, "run", "train --out a finished run",
          setup=both(lambda ctx: shutil.copytree(ctx.run, ctx.d / "run"), snapshot("run")), kept=unchanged("run")),
        E("analyze-out-file", "analyze", [*ANALYZE, "--out", "{d}/geo"], "geo", "analyze --out an existing file",
          setup=in_the_way("geo", "file"), kept=unchanged("geo")),
        E("redteam-out-file", "redteam", RED, "rt", "redteam --out an existing file", setup=in_the_way("rt", "file"),
          kept=unchanged("rt")),
        E("demo-out-file", "demo", DEMO, "demo", "demo --out an existing file", setup=in_the_way("demo", "file"),
          kept=unchanged("demo")),
        OK("stack-overwrite", "patch stack", [*STACK, "--weights", "2,1", "--overwrite"], overwritten("out"),
           "patch stack -o an existing patch --overwrite: replaced, nothing left beside it", setup=in_the_way("out")),
        OK("merge-overwrite", "patch merge", [*MERGE, "--overwrite"], overwritten("out", "model.safetensors"),
           "patch merge -o an existing model --overwrite", setup=in_the_way("out")),
    ] + race_cases() + crash_cases()


def overwritten(rel: str, key: str = "adapter_model.safetensors") -> Callable[[Ctx, Run], str | None]:
    def check(ctx: Ctx, run: Run) -> str | None:
        before = json.loads((ctx.d / ".snapshot.json").read_text())
        now = snapshot_of(ctx, rel)
        if key not in now or now.get(key) == before.get(key):
            return f"{rel} was not replaced"
        left = [p.name for p in (ctx.d / rel).parent.iterdir() if p.name.startswith(f".{rel}") and p.is_dir()]
        return f"left {left} beside the output" if left else None
    return check


def race_cases() -> list[Case]:
    def patch_out(ctx: Ctx) -> Any:
        return patch_state(sha256(ctx.d / "a" / "adapter_model.safetensors"),
                           sha256(ctx.d / "b" / "adapter_model.safetensors"))

    def refs(argv_a: list[str], argv_b: list[str], key: str = "adapter_model.safetensors") -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:  # the two outputs each writer would write alone, in d/a and d/b
            for name, argv in (("a", argv_a), ("b", argv_b)):
                reference(ctx, [x.replace("{d}/out", f"{{d}}/{name}") for x in argv], ctx.d / name, key)
        return setup

    def model_out(ctx: Ctx) -> Any:
        return files_state(("config.json", "model.safetensors"), sha256(ctx.d / "a" / "model.safetensors"),
                           sha256(ctx.d / "b" / "model.safetensors"), "model.safetensors")

    stack_a, stack_b = [*STACK, "--weights", "1,1"], [*STACK, "--weights", "2,1"]
    scale_a, scale_b = [*SCALE, "--factor", "2"], [*SCALE, "--factor", "3"]
    merge_b = [*MERGE[:4], "{patch2}", *MERGE[5:]]
    export_b = ["patch", "export", "{patch2}", *EXPORT[3:]]
    kw = {"kind": "race", "names": ("out",)}
    return [
        Case("race-stack", "patch stack", stack_a, note="two `patch stack` to one -o at once",
             setup=refs(stack_a, stack_b), runner=race([stack_a, stack_b], "{d}/out", patch_out), **kw),
        Case("race-scale", "patch scale", scale_a, note="two `patch scale` to one -o at once",
             setup=refs(scale_a, scale_b), runner=race([scale_a, scale_b], "{d}/out", patch_out), **kw),
        Case("race-merge", "patch merge", MERGE, note="two `patch merge` to one -o at once",
             setup=refs(MERGE, merge_b, "model.safetensors"), runner=race([MERGE, merge_b], "{d}/out", model_out),
             **kw),
        Case("race-export", "patch export", EXPORT, note="two `patch export` to one -o at once",
             setup=refs(EXPORT, export_b), runner=race([EXPORT, export_b], "{d}/out", export_state), **kw),
        Case("race-train", "train", TRAIN, note="two `train` to one --out at once", names=("run",), kind="race",
             runner=race([TRAIN, [*TRAIN, "--seed", "1"]], "{d}/run/patch", any_patch, reset="{d}/run")),
        Case("certificate-writers", "eval (record_evaluation)", note="4 processes x 50 certificate entries in one "
             "patch.json", expect="ok", kind="race", runner=certificate_writers(4, 50)),
    ]


def export_state(ctx: Ctx) -> Any:
    a, b = (sha256(ctx.d / n / "adapter_model.safetensors") for n in "ab")
    return files_state(("adapter_config.json", "adapter_model.safetensors"), a, b, "adapter_model.safetensors")


def any_patch(ctx: Ctx) -> Any:
    def state(p: Path) -> str:
        ok = all((p / f).exists() for f in ("adapter_config.json", "adapter_model.safetensors", "patch.json"))
        return "new" if ok else ("absent" if not p.exists() else "partial")
    return state


def crash_cases() -> list[Case]:
    def prepare(argv_old: list[str], argv_new: list[str], key: str) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:  # the new output, in d/new; then the old one in place at the output
            target = next(a for a in argv_old if a.startswith("{d}/out"))
            new = target.replace("{d}/out", "{d}/new")
            reference(ctx, [new if a == target else a for a in argv_new if a != "--overwrite"],
                      Path(ctx.fmt(new)), key)
            reference(ctx, argv_old, Path(ctx.fmt(target)), key)
        return setup

    def state(target: str, files: tuple[str, ...], key: str) -> Callable[[Ctx], Any]:
        def make(ctx: Ctx) -> Any:
            new = Path(ctx.fmt(target.replace("{d}/out", "{d}/new")))
            old = Path(ctx.fmt(target))
            return files_state(files, sha256(old / key if key else old), sha256(new / key if key else new), key)
        return make

    patch_files = ("adapter_config.json", "adapter_model.safetensors", "patch.json")
    model_files = ("config.json", "model.safetensors")
    specs = [("stack", [*STACK, "--weights", "1,1"], [*STACK, "--weights", "2,1", "--overwrite"], "{d}/out",
              patch_files, "adapter_model.safetensors"),
             ("scale", [*SCALE, "--factor", "2"], [*SCALE, "--factor", "3", "--overwrite"], "{d}/out", patch_files,
              "adapter_model.safetensors"),
             ("merge", MERGE, [*MERGE[:4], "{patch2}", *MERGE[5:], "--overwrite"], "{d}/out", model_files,
              "model.safetensors"),
             ("export", EXPORT, ["patch", "export", "{patch2}", *EXPORT[3:], "--overwrite"], "{d}/out",
              ("adapter_config.json", "adapter_model.safetensors"), "adapter_model.safetensors"),
             ("gguf", GGUF, ["patch", "export", "{patch2}", *GGUF[3:], "--overwrite"], "{d}/out.gguf", (), "")]
    cases = []
    for name, old, new, target, files, key in specs:
        cases.append(Case(f"crash-{name}-overwrite", f"patch {'export' if name == 'gguf' else name}", new,
                          expect="ok", kind="crash", setup=prepare(old, new, key),
                          note=f"`patch {name} --overwrite` killed at every file-system change",
                          runner=crash_everywhere(new, target, state(target, files, key))))
    for name, old, new, target, files, key in specs[:3:2]:
        cases.append(Case(f"crash-{name}-stale-temps", f"patch {name}", new, expect="ok", kind="crash",
                          setup=prepare(old, new, key),
                          note=f"after killed `patch {name}` writers, the next write removes their temp dirs",
                          runner=stale_cleanup(new, target)))
    cases.append(Case("crash-train-resume", "train", TRAIN, expect="ok", kind="crash",
                      note="`train` killed at every file-system change, then --resume: the same patch, no repeated "
                           "log steps", runner=resume_after_kill(TRAIN)))
    return cases


def resume_cases() -> list[Case]:
    def unfinished(ctx: Ctx) -> None:  # a run killed after its last checkpoint, before the patch was saved
        shutil.copytree(ctx.run, ctx.d / "run")
        shutil.rmtree(ctx.d / "run" / "patch")
        (ctx.d / "run" / "train_stats.json").unlink()

    def typo(argv: list[str]) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            from bad_inputs import call_forked

            call_forked([ctx.fmt(a) for a in argv], ctx.d)
        return setup

    def same_patch(ctx: Ctx, run: Run) -> str | None:
        p = ctx.d / "run" / "patch" / "adapter_model.safetensors"
        if not p.exists():
            return "no patch written"
        return None if sha256(p) == sha256(ctx.patch / "adapter_model.safetensors") else "a different patch"

    res = [*TRAIN, "--resume"]
    ck = "run/checkpoint/"
    return [
        E("resume-changed-lr", "train", [*res, "--lr", "0.01"], "lr", "train --resume with a changed --lr",
          setup=unfinished),
        E("resume-changed-layers", "train", [*res, "--layers", "1"], "layers", "train --resume with changed --layers",
          setup=unfinished),
        E("resume-changed-rank", "train", [*res, "--rank", "3"], "rank", "train --resume with a changed --rank",
          setup=unfinished),
        E("resume-truncated-state", "train", res, "state.safetensors", "train --resume, checkpoint "
          "state.safetensors truncated", setup=both(unfinished, truncate(ck + "state.safetensors"))),
        E("resume-damaged-state-json", "train", res, "state.json", "train --resume, checkpoint state.json damaged",
          setup=both(unfinished, write(ck + "state.json", "{bad"))),
        E("resume-empty-state-json", "train", res, "state.json", "train --resume, checkpoint state.json is {}",
          setup=both(unfinished, write(ck + "state.json", "{}"))),
        E("resume-damaged-train-config", "train", res, "train_config.json", "train --resume, train_config.json "
          "damaged", setup=both(unfinished, write("run/train_config.json", "{bad"))),
        OK("resume-unchanged", "train", res, same_patch, "train --resume of a run killed before saving: the same patch",
           setup=unfinished),
        E("resume-finished", "train", res, ("run", "finished"), "train --resume of a finished run",
          setup=lambda ctx: shutil.copytree(ctx.run, ctx.d / "run")),
        OK("train-after-typo", "train", TRAIN, same_patch, "train after the same command with a typo (--layers 5)",
           setup=typo([*TRAIN, "--layers", "5"])),
        OK("train-after-bad-lr", "train", TRAIN, same_patch, "train after the same command with --lr nan",
           setup=typo([*TRAIN, "--lr", "nan"])),
        EITHER("resume-after-typo", "train", res, "run", same_patch, "train --resume after a typo (--layers 5)",
               setup=typo([*TRAIN, "--layers", "5"])),
        EITHER("resume-nothing", "train", res, "run", same_patch, "train --resume with no run there yet"),
    ]


HUGE = "Tell me about safety. " * 48_000  # about 1 MB: 2,000 times the tiny model's context


def text_cases() -> list[Case]:
    red = [a if a != "{harmful}" else "{d}/latin1.jsonl" for a in RED]
    cal = [a if a != "{harmful}" else "{d}/latin1.jsonl" for a in CAL]
    huge_row = json.dumps({"prompt": HUGE, "response": "I can't."}) + "\n"
    return [
        E("redteam-pool-non-utf8", "redteam", red, "latin1.jsonl", "redteam --pool a Latin-1 file",
          setup=write("latin1.jsonl", LATIN1)),
        E("calibrate-dev-non-utf8", "calibrate", cal, "latin1.jsonl", "calibrate --dev-harmful a Latin-1 file",
          setup=write("latin1.jsonl", LATIN1)),
        EITHER("eval-huge-prompt", "eval --prompts", [a if a != "{prompts}" else "{d}/huge.jsonl" for a in EVAL],
               ("huge.jsonl", "prompt"), all_of(n_evaluated(2), says("truncat", "cut to")),
               "eval --prompts with a 1 MB prompt (truncated with a message, or refused)",
               setup=write("huge.jsonl", json.dumps({"prompt": HUGE}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")),
        OK("train-huge-prompt", "train", [*TRAIN[:3], "--data", "{d}/huge.jsonl", *TRAIN[5:]], finite("run/patch"),
           "train --data with a 1 MB prompt (truncated to --max-length)",
           setup=write("huge.jsonl", huge_row + "".join(json.dumps({"prompt": f"Q{i}", "response": "I can't."}) + "\n"
                                                        for i in range(7)))),
        EITHER("chat-huge-prompt", "chat", CHAT, "prompt", says("truncat", "cut to"), "chat with a 1 MB line",
               stdin=HUGE + "\n"),
    ]


def flag_cases() -> list[Case]:
    return [
        E("eval-abbrev-max-new-token", "eval --prompts", [*EVAL[:-2], "--max-new-token", "2"], "--max-new-token",
          "eval --max-new-token (an abbreviation)"),
        E("train-abbrev-epoch", "train", [*TRAIN, "--epoch", "1"], "--epoch", "train --epoch (an abbreviation)"),
        E("scale-abbrev-fact", "patch scale", [*SCALE, "--fact", "2"], "--fact", "patch scale --fact"),
        E("calibrate-abbrev-factor", "calibrate", [*CAL, "--factor", "1"], "--factor", "calibrate --factor "
          "(abbreviates --factors)"),
        E("chat-abbrev-max", "chat", [*CHAT, "--max", "4"], "--max", "chat --max"),
        EITHER("eval-db-with-prompts", "eval --prompts", [*EVAL, "--db", "{d}/results.db"], "--db", db_has_run,
               "eval --prompts with --db (recorded there, or refused)"),
        E("eval-finetuned-with-prompts", "eval --prompts", [*EVAL, "--finetuned", "{model}"], "--finetuned",
          "eval --prompts with --finetuned"),
        E("eval-suite-and-prompts", "eval", [*EVAL, "--suite", "{suite}"], ("--suite", "--prompts"),
          "eval with both --suite and --prompts"),
        E("analyze-patch-and-finetuned", "analyze", [*ANALYZE, "--finetuned", "{model}"], ("--finetuned", "--patch"),
          "analyze with both --patch and --finetuned"),
    ]


def sweep_report_cases() -> list[Case]:
    """`safetypatch sweep` files and flags (checked before anything trains), `safetypatch report` inputs."""
    sw = ["sweep", "{d}/s.yaml", "--out", "{d}/sw"]
    recipe = ("recipe: {model: '@model', data: '@harmful', benign: '@benign', dev_harmful: '@harmful', "
              "dev_benign: '@benign', target_modules: [up_proj], layers: all}\n")

    def sweep(body: str | bytes) -> Callable[[Ctx], None]:
        """Write the sweep file with the tiny model and data paths in place of @model / @harmful / @benign (YAML's
        braces rule out str.format)."""
        def setup(ctx: Ctx) -> None:
            text = body.decode("latin-1") if isinstance(body, bytes) else body
            for key, value in (("@model", ctx.model), ("@harmful", ctx.data["harmful"]),
                               ("@benign", ctx.data["benign"])):
                text = text.replace(key, str(value))
            write("s.yaml", text.encode("latin-1") if isinstance(body, bytes) else text)(ctx)
        return setup

    grid = sweep(recipe + "grid: {rank: [1, 2]}\n")
    report = ["report", "{d}/in", "-o", "{d}/r.html"]
    return [
        E("sweep-key-not-recipe", "sweep", sw, ("rnak", "valid keys"), "sweep grid key 'rnak'",
          setup=sweep(recipe + "grid: {rnak: [1, 2]}\n")),
        E("sweep-grid-empty-list", "sweep", sw, "grid.rank", "sweep grid rank: []",
          setup=sweep(recipe + "grid: {rank: []}\n")),
        E("sweep-no-points", "sweep", sw, "grid", "sweep with neither grid nor points", setup=sweep(recipe)),
        E("sweep-value-type", "sweep", sw, "rank", "sweep grid rank: [1, four]",
          setup=sweep(recipe + "grid: {rank: [1, four]}\n")),
        E("sweep-role-missing", "sweep", sw, "attn.qq", "sweep point targeting a module the model lacks",
          setup=sweep(recipe + "grid: {target_modules: [up_proj, attn.qq]}\n")),
        E("sweep-file-missing", "sweep", ["sweep", "{d}/nosuch.yaml", "--out", "{d}/sw"], "nosuch.yaml",
          "sweep file that does not exist"),
        E("sweep-unknown-name", "sweep", ["sweep", "nosuch_sweep", "--out", "{d}/sw"], "nosuch_sweep",
          "sweep name that is not shipped"),
        E("sweep-yaml-list", "sweep", sw, "s.yaml", "a sweep file holding a list", setup=sweep("- 1\n")),
        E("sweep-yaml-non-utf8", "sweep", sw, "s.yaml", "a Latin-1 sweep file",
          setup=sweep((recipe + "name: caf\xe9\ngrid: {rank: [1]}\n").encode("latin-1"))),
        E("sweep-jobs-zero", "sweep", [*sw, "--jobs", "0"], "--jobs", "sweep --jobs 0", setup=grid),
        E("sweep-jobs-no-gpu", "sweep", [*sw, "--jobs", "2"], "--jobs", "sweep --jobs 2 on a CPU machine",
          setup=grid),
        E("sweep-only-unknown", "sweep", [*sw, "--only", "rank-3"], ("--only", "rank-3"), "sweep --only rank-3",
          setup=grid),
        E("sweep-out-is-file", "sweep", sw, "{d}/sw", "sweep --out naming a file",
          setup=both(grid, write("sw", "x"))),
        E("report-input-missing", "report", report, "{d}/in", "report over a path that does not exist"),
        E("report-input-not-a-run", "report", report, "{d}/in", "report over an empty directory", setup=mkdir("in")),
        E("report-sweep-json-corrupt", "report", report, "sweep.json", "report over a sweep with a broken sweep.json",
          setup=write("in/sweep.json", "{not json")),
        E("report-output-exists", "report", ["report", "{d}/in", "-o", "{d}/r.html"], "{d}/r.html",
          "report onto an existing file without --overwrite",
          setup=both(write("r.html", "keep"), write("in/summary.json", "{}"))),
    ]


def scale_cases() -> list[Case]:
    """Multi-process training and large-model loading (issue 20): refused before any process starts or any
    weight loads, on this CPU machine."""
    return [
        E("train-launch-fsdp-cpu", "train", [*TRAIN, "--launch", "fsdp", "--num-processes", "2"],
          ("--launch fsdp", "--launch ddp"), "train --launch fsdp on a machine without GPUs"),
        E("train-launch-batch-split", "train", [*TRAIN, "--launch", "ddp", "--num-processes", "3",
                                                "--batch-size", "4"], ("--batch-size 4", "3 processes"),
          "train --launch ddp with a world size that does not divide the batch"),
        E("train-launch-no-count", "train", [*TRAIN, "--launch", "ddp"], "--num-processes",
          "train --launch ddp on a CPU without --num-processes"),
        E("train-num-processes-alone", "train", [*TRAIN, "--num-processes", "2"], "--launch",
          "train --num-processes without --launch"),
        E("train-launch-data-missing", "train", [*train_data("{d}/nope.jsonl"), "--launch", "ddp",
                                                 "--num-processes", "2"], "nope.jsonl",
          "train --launch ddp with a --data file that does not exist (one line before any rank starts)"),
        E("train-launch-unknown", "train", [*TRAIN, "--launch", "horovod"], "--launch", "train --launch horovod"),
        E("train-4bit-on-cpu", "train", [*TRAIN, "--load-in-4bit", "true"], "load_in_4bit",
          "train --load-in-4bit on a machine without a GPU"),
        E("train-model-dtype", "train", [*TRAIN, "--model-dtype", "int8"], "model_dtype", "train --model-dtype int8"),
        E("eval-vllm-missing", "eval --prompts", [*EVAL, "--backend", "vllm"], ("vLLM", "not installed"),
          "eval --backend vllm where vLLM is not installed (the project venv)"),
        E("suite-vllm-missing", "eval --suite", [*SUITE, "--backend", "vllm"], ("vLLM", "not installed"),
          "eval --suite --backend vllm where vLLM is not installed"),
        E("eval-vllm-flag-alone", "eval --prompts", [*EVAL, "--tensor-parallel", "2"], ("--tensor-parallel",
                                                                                        "--backend vllm"),
          "eval --tensor-parallel without --backend vllm"),
        E("eval-vllm-lora-rank", "eval --prompts", [*EVAL, "--backend", "vllm", "--max-lora-rank", "3"],
          "--max-lora-rank 3", "eval --backend vllm --max-lora-rank 3 (a rank vLLM does not accept)"),
        E("eval-prefill-neg", "eval --prompts", [*EVAL, "--prefill", "-5"], "--prefill",
          "eval --prefill -5 (a negative prefill length)", check=no_certificate),
        E("eval-prefill-text-empty", "eval --prompts", [*EVAL, "--prefill-text", ""], "--prefill-text",
          "eval --prefill-text '' (an empty opening)", check=no_certificate),
        E("eval-prefill-source-alone", "eval --prompts", [*EVAL, "--prefill-source", "target"], "--prefill-source",
          "eval --prefill-source without --prefill K (no k to cut its answers to)", check=no_certificate),
        E("eval-prefill-source-missing-field", "eval --prompts", [*EVAL, "--prefill", "5", "--prefill-source",
                                                                  "no_such_field"], "--prefill-source",
          "eval --prefill 5 --prefill-source naming a field no prompt has", check=no_certificate),
        E("suite-prefill-flag", "eval --suite", [*SUITE, "--prefill", "5"], "--prefill",
          "eval --suite with --prefill (a suite's prefill attack is a `type: prefill` entry)"),
        E("train-recovery-prefix-order", "train", [*TRAIN, "--recovery-min-prefix", "30", "--recovery-max-prefix",
                                                   "10"], "recovery_min_prefix",
          "train --recovery-min-prefix 30 --recovery-max-prefix 10 (an empty range of prefix lengths)"),
        E("train-recovery-source-missing", "train", [*TRAIN, "--recovery-source", "{d}/nope.jsonl"], "nope.jsonl",
          "train --recovery-source naming a file that does not exist"),
        E("gcg-budget-unknown", "gcg", ["gcg", "--model", "{model}", "--patch", "{patch}", "--budget", "huge",
                                        "--out", "{d}/gcg"], "--budget", "gcg --budget huge"),
        E("gcg-steps-zero", "gcg", ["gcg", "--model", "{model}", "--patch", "{patch}", "--steps", "0",
                                    "--out", "{d}/gcg"], "steps", "gcg --steps 0"),
    ]


def all_cases() -> list[Case]:
    groups = {"numbers": number_cases(), "files": file_cases(), "patch": patch_cases(), "names": name_cases(),
              "outputs": output_cases(), "resume": resume_cases(), "text": text_cases(), "flags": flag_cases(),
              "sweeps": sweep_report_cases(), "scale": scale_cases()}
    out = []
    for kind, cases in groups.items():
        for c in cases:
            c.kind = c.kind or kind
            out.append(c)
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return out
