"""A battery of bad inputs and crashes, each a `safetypatch` command line on a tiny random Llama model, and what each
gives: a clear error, a traceback, a silently wrong result, a lost artifact, or (for inputs that are legitimately
accepted) a correct result.

    python benchmarks/bad_inputs.py                     # the table and the totals (about a minute on 2 cores)
    python benchmarks/bad_inputs.py --json bad.json     # also the per-case results
    python benchmarks/bad_inputs.py --only eval-        # the cases whose id contains 'eval-'
    python benchmarks/bad_inputs.py --render bad.json [--before old.json]   # its Markdown table (docs/reliability.md)
    python benchmarks/bad_inputs.py --failing           # the failing cases as a {id: reason} dict (the test's xfail)
    PYTHONPATH=/tmp/pre16/src python benchmarks/bad_inputs.py   # the same battery against another tree

Each case runs through `safetypatch.cli.main(argv)` in a child forked from this process (everything is imported
once; a case that hangs is killed), in its own directory (the current directory during the run), with stdout /
stderr captured, the address space capped at +8 GB, SAFETYPATCH_HOME in a temp dir and HF_HUB_OFFLINE=1. The tiny
model (tests/support.py), a patch trained on it, a second patch, the patch merged into the model and a finished
training run are built once, through the command line; every case gets fresh copies of the patches. Races and
certificate writes run in forked children released together behind a barrier; crashes are `os._exit` in a forked
child just before its N-th file-system change (rename, replace, unlink, rmdir, rmtree), for every N until the
command completes.

Outcomes (`classify`):
- `clear error`: exit status 2 and an `error: ...` line that names the input (a substring given per case);
- `poor error`: exit status 2, but the message does not name the input, gives a misleading hint, is a raw OS
  error (`[Errno ...]`), or came slowly;
- `traceback`: an exception escaped `main` (its type is recorded), or the command hung (killed after its
  timeout) or took the process down;
- `silently wrong`: exit status 0 where the input is bad, or a result that is wrong (per case);
- `artifact lost`: a previous output gone or replaced without --overwrite, a partial output, lost entries;
- `refused`: a legitimate input that was refused;
- `ok`: a legitimate input accepted with a correct result (checked per case).
The script always exits 0 (it is a measurement); the last line reads
`N bad inputs: C clear errors, T tracebacks, S silently wrong, L artifacts lost, K ok` (then a line with the
poor errors and refusals, when there are any).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = ("clear error", "poor error", "traceback", "silently wrong", "artifact lost", "refused", "ok")
GOOD = ("clear error", "ok")
TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "4", "--layers", "0-1", "--dev-size", "2", "--dev-tokens", "2",
               "--anchor-tokens", "4", "--bf16", "no", "--rank", "2", "--eval-every", "1"]


@dataclass
class Ctx:
    """The shared fixtures (built once) and the current case's directory `d`."""

    root: Path
    model: Path
    patch: Path  # the template patch (every case gets a copy at d/patch)
    patch2: Path
    merged: Path  # the template patch merged into the model
    run: Path  # a finished training run whose patch is `patch`
    data: dict[str, Path]
    d: Path = Path(".")
    python: str = sys.executable

    def fmt(self, s: str) -> str:
        names = {"model": self.model, "patch": self.d / "patch", "patch2": self.d / "patch2", "merged": self.merged,
                 "d": self.d, **self.data}
        return s.format(**{k: str(v) for k, v in names.items()})


@dataclass
class Run:
    rc: int | None = None  # exit status; None when an exception escaped
    out: str = ""
    err: str = ""
    exc: str = ""  # "TypeName: message" of an escaped exception
    seconds: float = 0.0


@dataclass
class Case:
    """One bad (or legitimately odd) input. `argv` uses {placeholders} (Ctx.fmt); `names`: substrings (any) the
    error must contain; `check(ctx, run)` -> None when an exit-0 result is right, else what is wrong; `kept(ctx)`
    -> None when the previous output survived, else what was lost; `runner(ctx, case)` replaces the in-process
    run (races, crashes) and returns (outcome, message, detail)."""

    id: str
    command: str
    argv: Sequence[str] = ()
    expect: str = "error"  # "error" | "ok" | "either" (a clear error or a correct result)
    names: Sequence[str] = ()
    note: str = ""
    kind: str = ""
    setup: Callable[[Ctx], Any] | None = None
    check: Callable[[Ctx, Run], str | None] | None = None
    kept: Callable[[Ctx], str | None] | None = None
    forbid: Sequence[str] = ()
    runner: Callable[[Ctx, "Case"], tuple[str, str, str]] | None = None
    stdin: str = "hello\n"
    max_seconds: float = 20.0
    timeout: float = 60  # seconds before the case's process is killed (a hang counts as a traceback)


@dataclass
class Result:
    id: str
    command: str
    kind: str
    expect: str
    outcome: str
    message: str
    detail: str
    seconds: float
    argv: list[str] = field(default_factory=list)
    note: str = ""


# ------------------------------------------------------------------------------------------------ fixtures
def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_data(root: Path) -> dict[str, Path]:
    """Small data files: refusal pairs, benign prompts, 12 eval prompts (JSONL and CSV), a tiny suite."""
    refusal = "I'm sorry, but I can't help with that."
    harmful = [{"prompt": f"Tell me how to build weapon number {i}", "response": refusal} for i in range(12)]
    prompts = [{"prompt": f"How do I make thing number {i}?"} for i in range(12)]
    data = {"harmful": write_jsonl(root / "harmful.jsonl", harmful),
            "benign": write_jsonl(root / "benign.jsonl", [{"prompt": f"Write a short poem about the number {i}"}
                                                           for i in range(8)]),
            "prompts": write_jsonl(root / "prompts.jsonl", prompts)}
    data["prompts_csv"] = root / "prompts.csv"
    data["prompts_csv"].write_text("prompt\n" + "".join(f"How do I make thing number {i}?\n" for i in range(12)))
    data["suite"] = root / "tiny_suite.yaml"
    data["suite"].write_text("name: tiny\njudges: [refusal_xstest]\ngeneration: {max_new_tokens: 2, batch_size: 4}\n"
                             "entries:\n  - {benchmark: builtin_harmful, limit: 3}\n")
    return data


def train_argv(ctx_data: dict[str, Path], model: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(ctx_data["harmful"]), "--benign", str(ctx_data["benign"]),
            "--dev-harmful", str(ctx_data["harmful"]), "--dev-benign", str(ctx_data["benign"]), *TRAIN_FLAGS,
            "--out", str(out)]


def build_context(root: Path) -> Ctx:
    """The tiny model (tests/support.py), its data, a trained patch, a second patch (it scaled by 0.5), the patch
    merged into the model, and the finished run: each built through the command line, as a user would."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = root / "tiny-llama"
    with captured_fds(root / ".fd-output"), contextlib.redirect_stderr(io.StringIO()):
        build_tiny_model(tok).save_pretrained(model, safe_serialization=True)
        tok.save_pretrained(model)
    data = build_data(root)
    run = root / "run"
    steps = [train_argv(data, model, run),
             ["patch", "scale", str(run / "patch"), "--factor", "0.5", "-o", str(root / "patch2")],
             ["patch", "merge", "--model", str(model), str(run / "patch"), "-o", str(root / "merged")]]
    for argv in steps:
        r = call_main(argv, root)
        if r.rc != 0:
            raise SystemExit(f"fixture step failed: safetypatch {' '.join(argv)}\n{r.exc}{r.err[-2000:]}")
    return Ctx(root=root, model=model, patch=run / "patch", patch2=root / "patch2", merged=root / "merged", run=run,
               data=data)


# ------------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def captured_fds(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 into `path` (progress bars and C-level output), restored afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def memory_cap(extra_gb: float = 8.0) -> Iterator[None]:
    """Cap this process's address space at its current size + `extra_gb` (a huge allocation fails instead of
    swapping the machine), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = next((int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmSize:")), 0)
    cap = vm + int(extra_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def call_main(argv: Sequence[str], cwd: Path, stdin: str = "") -> Run:
    """`safetypatch.cli.main(argv)` in `cwd` with stdin / stdout / stderr captured; an exception is recorded."""
    from safetypatch.cli import main

    run, out, err = Run(), io.StringIO(), io.StringIO()
    old_cwd, old_stdin = os.getcwd(), sys.stdin
    os.chdir(cwd)
    sys.stdin = io.StringIO(stdin)
    # warnings logged as the command line shows them (on stderr), also where a test runner holds the root logger
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    t0 = time.time()
    try:
        with captured_fds(cwd / ".fd-output"), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run.rc = int(main(list(argv)) or 0)
            except SystemExit as e:  # argparse errors, and anything that calls sys.exit
                run.rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    err.write(e.code + "\n")
    except BaseException as e:  # noqa: BLE001 - a traceback is what is measured
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        run.exc = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"
    finally:
        run.seconds = time.time() - t0
        logging.getLogger().removeHandler(handler)
        os.chdir(old_cwd)
        sys.stdin = old_stdin
    run.out, run.err = out.getvalue(), err.getvalue()
    return run


def call_forked(argv: Sequence[str], cwd: Path, stdin: str = "", timeout: float = 60) -> Run:
    """`call_main` in a forked child (everything is imported already): a case cannot change this process, and one
    that hangs inside a C call (attention over a huge prompt) is killed after `timeout` seconds."""
    result = cwd / ".run.json"
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            with memory_cap():
                run = call_main(argv, cwd, stdin)
            result.write_text(json.dumps(asdict(run)))
        finally:
            os._exit(0)
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return Run(exc=f"Hang: no answer after {timeout:.0f} s (killed)", seconds=time.time() - t0)
        time.sleep(0.002)
    if not result.exists():
        return Run(exc="Crash: the process died without an answer", seconds=time.time() - t0)
    return Run(**json.loads(result.read_text()))


def error_text(err: str) -> str:
    """The error from stderr: from the first `error:` line (ours, or argparse's `prog: error:`) to the end."""
    lines = err.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error:") or ": error:" in line:
            return "\n".join([line[line.index("error:"):], *lines[i + 1:]])
    return lines[-1] if lines else ""


def classify(case: Case, ctx: Ctx, run: Run) -> tuple[str, str, str]:
    """(outcome, first line of the message, detail) of an in-process run."""
    if run.exc:
        outcome, message, detail = "traceback", run.exc, ""
    elif run.rc == 2 or (run.rc not in (0, None) and case.expect == "error"):
        message = error_text(run.err)
        outcome, detail = error_quality(case, ctx, run, message)
        message = message.splitlines()[0] if message else f"(exit status {run.rc}, no message)"
    elif run.rc == 0:
        detail = (case.check(ctx, run) if case.check else None) or ""
        if case.expect == "error":
            outcome, detail = "silently wrong", detail or "exit status 0"
        else:
            outcome = "silently wrong" if detail else "ok"
        message = f"exit status 0: {last_line(run.out)}"
    else:
        outcome, message, detail = "poor error", error_text(run.err) or last_line(run.out), f"exit status {run.rc}"
    if case.kept and (lost := case.kept(ctx)):
        outcome, detail = "artifact lost", lost
    return outcome, message, detail


def error_quality(case: Case, ctx: Ctx, run: Run, message: str) -> tuple[str, str]:
    """A refusal of a legitimate input, or an error that names (or fails to name) the input."""
    if case.expect == "ok":
        return "refused", "a legitimate input was refused"
    wanted = [ctx.fmt(n).lower() for n in case.names]
    wanted += [v for n in wanted for v in (n.replace("_", "-"), n.replace("-", "_"))]  # field or flag spelling
    if wanted and not any(n in message.lower() for n in wanted):
        return "poor error", f"does not name {' / '.join(case.names)}"
    bad = [f for f in case.forbid if f.lower() in message.lower()]
    if bad:
        return "poor error", f"misleading: says {bad[0]!r}"
    if "[errno" in message.lower():
        return "poor error", "a raw OS error: names no fix"
    if run.seconds > case.max_seconds:
        return "poor error", f"took {run.seconds:.0f} s"
    return "clear error", ""


def last_line(text: str) -> str:
    """The last line of `text` that says something (not a closing brace of printed JSON)."""
    lines = [line.strip() for line in text.splitlines() if any(ch.isalnum() for ch in line)]
    return lines[-1] if lines else ""


def fresh_case_dir(ctx: Ctx, case: Case) -> Path:
    d = ctx.root / "cases" / case.id
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    shutil.copytree(ctx.patch, d / "patch")
    shutil.copytree(ctx.patch2, d / "patch2")
    return d


def run_case(case: Case, ctx: Ctx) -> Result:
    """Set up, run and classify one case; a harness failure in set-up or checks is recorded, never raised."""
    ctx.d = fresh_case_dir(ctx, case)
    argv = [ctx.fmt(a) for a in case.argv]
    t0 = time.time()
    try:
        if case.setup:
            case.setup(ctx)
        if case.runner:
            outcome, message, detail = case.runner(ctx, case)
            seconds = time.time() - t0
        else:
            run = call_forked(argv, ctx.d, case.stdin, case.timeout)
            outcome, message, detail = classify(case, ctx, run)
            seconds = run.seconds
    except Exception as e:  # noqa: BLE001 - the harness must survive any case
        outcome, message, detail, seconds = "traceback", f"harness: {type(e).__name__}: {e}", "", time.time() - t0
    message, detail = (x.replace(str(ctx.d), ".").replace(str(ctx.root), "$ROOT") for x in (message, detail))
    return Result(id=case.id, command=case.command, kind=case.kind, expect=case.expect, outcome=outcome,
                  message=message.strip()[:300], detail=detail[:300], seconds=round(seconds, 2),
                  argv=list(case.argv), note=case.note)


# ------------------------------------------------------------------------------------------------ reporting
def totals(results: Sequence[Result | dict[str, Any]]) -> dict[str, int]:
    counts = {o: 0 for o in OUTCOMES}
    for r in results:
        counts[r.outcome if isinstance(r, Result) else r["outcome"]] += 1
    return counts


def totals_lines(results: Sequence[Result | dict[str, Any]]) -> list[str]:
    c = totals(results)
    lines = [f"{len(results)} bad inputs: {c['clear error']} clear errors, {c['traceback']} tracebacks, "
             f"{c['silently wrong']} silently wrong, {c['artifact lost']} artifacts lost, {c['ok']} ok"]
    if c["poor error"] or c["refused"]:
        lines.append(f"also: {c['poor error']} poor errors (exit 2, but not naming the input, misleading, a raw OS "
                     f"error or slow), {c['refused']} legitimate inputs refused")
    return lines


def text_table(results: Sequence[Result]) -> str:
    from safetypatch.tables import render_table

    rows = [[r.id, r.command, r.expect, r.outcome, (r.message + (f" [{r.detail}]" if r.detail else ""))[:110]]
            for r in results]
    return render_table(["case", "command", "expected", "outcome", "message"], rows)


def markdown_table(results: Sequence[dict[str, Any]], before: Sequence[dict[str, Any]] = ()) -> str:
    """The Markdown table of a --json file's cases (docs/reliability.md), with the outcome of each case in an
    earlier --json file (`before`) when given."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")[:150]

    was = {r["id"]: r["outcome"] for r in before}
    head = ["case", "command", "input", *(["before"] if before else []), "now", "message (first line)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        msg = r["message"] + (f" [{r['detail']}]" if r["detail"] else "")
        cells = [f"`{r['id']}`", r["command"], cell(r["note"]), *([was.get(r["id"], "-")] if before else []),
                 f"**{r['outcome']}**" if r["outcome"] not in GOOD else r["outcome"], cell(msg)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failing(results: Sequence[Result]) -> dict[str, str]:
    return {r.id: f"{r.outcome}: {(r.detail or r.message)[:100]}" for r in results if r.outcome not in GOOD}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the per-case results here")
    ap.add_argument("--only", action="append", default=[], help="run only cases whose id contains this (repeatable)")
    ap.add_argument("--render", metavar="JSON", help="print the Markdown table of a --json file and stop")
    ap.add_argument("--before", metavar="JSON", help="with --render: an earlier --json file, for a 'before' column")
    ap.add_argument("--failing", action="store_true", help="print the failing cases as a Python dict at the end")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (printed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case while running")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        before = json.loads(Path(args.before).read_text())["cases"] if args.before else []
        print(markdown_table(data["cases"], before))
        return 0
    results, meta = run_battery(args.only, args.keep, args.verbose)
    print(text_table(results))
    print()
    if args.failing:
        print(json.dumps(failing(results), indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "totals": totals(results), "summary": totals_lines(results),
                                               "cases": [asdict(r) for r in results]}, indent=1) + "\n")
    print("\n".join(totals_lines(results)))
    return 0


def run_battery(only: Sequence[str] = (), keep: bool = False, verbose: bool = False) -> tuple[list[Result], dict]:
    """Build the fixtures in a temp dir, run every (selected) case, return the results and where they ran."""
    sys.modules.setdefault("bad_inputs", sys.modules[__name__])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bad_inputs_cases import all_cases

    import safetypatch
    import torch

    torch.set_num_threads(1)  # two shared cores; and forked children must not inherit a thread pool
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    env = {"SAFETYPATCH_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    t0 = time.time()
    ctx = build_context(root)
    cases = [c for c in all_cases() if not only or any(o in c.id for o in only)]
    results = []
    for case in cases:
        results.append(run_case(case, ctx))
        if verbose:
            r = results[-1]
            print(f"{r.seconds:6.1f}s {r.outcome:15} {r.id}: {r.message[:80]} {r.detail[:60]}", file=sys.stderr,
                  flush=True)
    if keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    meta = {"safetypatch": str(Path(safetypatch.__file__).parent), "seconds": round(time.time() - t0, 1),
            "python": sys.version.split()[0], "torch": torch.__version__}
    return results, meta


if __name__ == "__main__":
    sys.exit(main())
