"""Runners of benchmarks/bad_inputs.py for what one in-process call cannot show: two writers at once and concurrent
certificate writes (forked children released together behind a barrier), and crashes (a forked child that `os._exit`s
just before its N-th file-system change, for every N until the command completes, as a `kill -9` would leave it).

The kill points are the calls of os.replace, os.rename, os.unlink, os.remove, os.rmdir, shutil.rmtree and
shutil.move (the ones inside rmtree included): a change made through libc directly (io_utils' renameat2 exchange)
is not a point itself, but the points just before and after it are. A runner returns (outcome, message, detail),
like `bad_inputs.classify`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bad_inputs import Case, Ctx, call_forked, error_text

FS_CHANGES = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (os, "rmdir"), (shutil, "rmtree"),
              (shutil, "move")]
State = Callable[[Path], str]  # "old", "new", or what is wrong with the output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ writers at once
def together(ctx: Ctx, jobs: Sequence[Callable[[], int]], timeout: float = 240) -> list[Finished]:
    """Run each job (a function returning an exit status) in a forked child of this process (everything is
    imported already), all released at once behind a barrier; their exit status and output."""
    go = ctx.d / ".go"
    pids = []
    for i, job in enumerate(jobs):
        out, err = ctx.d / f".out{i}", ctx.d / f".err{i}"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            forked_job(job, go, out, err)
        pids.append((pid, out, err))
    go.touch()
    deadline, done = time.time() + timeout, []
    for pid, out, err in pids:
        code = wait_child(pid, deadline)
        done.append(Finished(code, out.read_text(errors="replace"), err.read_text(errors="replace")))
    return done


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def forked_job(job: Callable[[], int], go: Path, out: Path, err: Path) -> None:
    """In a forked child: output into `out` / `err`, wait for `go`, run `job`, exit with its status (never return)."""
    code = 3
    try:
        fo, fe = open(out, "w"), open(err, "w")
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        sys.stdout, sys.stderr = fo, fe
        while not go.exists():
            time.sleep(0.0005)
        try:
            code = int(job() or 0)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the parent reads the traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait_child(pid: int, deadline: float) -> int:
    """The exit code of child `pid` (killed, -9, when `deadline` passes)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.005)


def cli(argv: Sequence[str]) -> Callable[[], int]:
    def job() -> int:
        from safetypatch.cli import main

        return main(list(argv))
    return job


def certify(patch: Path, writer: int, each: int) -> Callable[[], int]:
    def job() -> int:
        from safetypatch.patches import record_evaluation

        for i in range(each):
            record_evaluation(patch, {"suite": f"writer-{writer}-{i}", "refusal": {}})
        return 0
    return job


def exception_of(err: str) -> str:
    """The last line of a Python traceback in `err` ('' when there is none)."""
    if "Traceback (most recent call last)" not in err:
        return ""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else "Traceback"


def race(argvs: Sequence[Sequence[str]], out: str, state: Callable[[Ctx], State], reset: str = "",
         tries: int = 5) -> Callable[[Ctx, Case], tuple]:
    """Two (or more) writers to one output without --overwrite, `tries` times (the window a race needs is short):
    each time exactly one may win, the others must get a clear error, and the output must be complete. `reset`
    (default `out`) is removed, with what sits beside it, before each try."""
    def runner(ctx: Ctx, case: Case) -> tuple[str, str, str]:
        check = state(ctx)
        result: tuple[str, str, str] = ("refused", "", "no try")
        for i in range(tries):
            remove_output(Path(ctx.fmt(reset or out)))
            result = race_once(ctx, case, argvs, Path(ctx.fmt(out)), check)
            if result[0] != "clear error":
                return result[0], result[1], f"try {i + 1} of {tries}: {result[2]}".rstrip(": ")
        return result[0], result[1], f"{tries} tries, one winner each time"
    return runner


def remove_output(p: Path) -> None:
    """`p` and whatever sits beside it under its name (temp copies, lock files)."""
    if p.parent.exists():
        for q in p.parent.iterdir():
            if q == p or q.name.startswith(f".{p.name}."):
                shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()


def race_once(ctx: Ctx, case: Case, argvs: Sequence[Sequence[str]], out: Path, check: State) -> tuple[str, str, str]:
    procs = together(ctx, [cli([ctx.fmt(a) for a in argv]) for argv in argvs])
    crashed = [e for e in (exception_of(p.stderr) for p in procs) if e]
    if crashed:
        return "traceback", crashed[0], ""
    won = [p for p in procs if p.returncode == 0]
    lost = [p for p in procs if p.returncode != 0]
    now = check(out)
    if len(won) > 1:
        return "artifact lost", f"{len(won)} writers exited 0", f"one result silently replaced the other ({now})"
    if not won:
        return "refused", error_text(lost[0].stderr).splitlines()[0], "no writer succeeded"
    if now not in ("old", "new"):
        return "artifact lost", error_text(lost[0].stderr).splitlines()[0], f"the output is {now}"
    message = error_text(lost[0].stderr)
    named = any(ctx.fmt(n).lower() in message.lower() for n in case.names) or not case.names
    return ("clear error" if named and lost[0].returncode == 2 else "poor error",
            message.splitlines()[0] if message else f"exit status {lost[0].returncode}",
            "" if named else f"does not name {' / '.join(case.names)}")


def certificate_writers(writers: int = 4, each: int = 50) -> Callable[[Ctx, Case], tuple]:
    """`writers` processes each recording `each` evaluations in one patch.json: every entry must be kept."""
    def runner(ctx: Ctx, case: Case) -> tuple[str, str, str]:
        patch = ctx.d / "patch"
        procs = together(ctx, [certify(patch, i, each) for i in range(writers)])
        crashed = [e for e in (exception_of(p.stderr) for p in procs) if e]
        if crashed:
            return "traceback", crashed[0], ""
        try:
            kept = len(json.loads((patch / "patch.json").read_text()).get("evaluations", []))
        except (OSError, ValueError) as e:
            return "artifact lost", f"patch.json unreadable afterwards: {e}", ""
        want = writers * each
        if kept != want:
            return "artifact lost", f"kept {kept} of {want} evaluations", f"{want - kept} certificate entries lost"
        return "ok", f"kept {kept} of {want} evaluations", ""
    return runner


# ------------------------------------------------------------------------------------------------ crashes
def crash_child(argv: Sequence[str], cwd: Path, n: int) -> None:
    """In a forked child: run `main(argv)`, dying (os._exit(137), no clean-up) just before file-system change n."""
    count = [0]

    def hook(orig: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            count[0] += 1
            if count[0] == n:
                os._exit(137)
            return orig(*a, **k)
        return wrapped

    try:
        for mod, name in FS_CHANGES:
            setattr(mod, name, hook(getattr(mod, name)))
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        os.chdir(cwd)
        from safetypatch.cli import main

        rc = main(list(argv))
        os._exit(0 if rc == 0 else 4)
    except BaseException:  # noqa: BLE001
        os._exit(3)


def crash_at(argv: Sequence[str], cwd: Path, n: int, timeout: float = 120) -> int:
    """Exit code of a forked run of `argv` killed just before its n-th file-system change (137), 0 if it finished
    first, 3 for an exception, 4 for a non-zero exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        crash_child(argv, cwd, n)
    return wait_child(pid, time.time() + timeout)


def leftovers(out: Path) -> list[str]:
    """Hidden temp directories beside `out` that belong to it (what a killed writer leaves)."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}") and p.is_dir())


def crash_everywhere(argv: Sequence[str], out: str, state: Callable[[Ctx], State]) -> Callable[[Ctx, Case], tuple]:
    """Kill `argv` (an --overwrite of an existing output) before each of its file-system changes in turn: the
    output must always be the old or the new one."""
    def runner(ctx: Ctx, case: Case) -> tuple[str, str, str]:
        check, target = state(ctx), Path(ctx.fmt(out))
        args = [ctx.fmt(a) for a in argv]
        points, code = kill_points(args, ctx.d, lambda n: check(target))
        if code not in (0, 137):
            return "traceback", f"the writer failed (exit code {code}) without a crash", ""
        bad = [f"#{n}: {now}" for n, now in points if now not in ("old", "new")]
        if bad:
            return "artifact lost", f"killed before file-system change {bad[0]}", f"{len(bad)} of {len(points)} points"
        return "ok", f"killed at each of {len(points)} points: always the old or the new output", ""
    return runner


def kill_points(args: Sequence[str], cwd: Path, after: Callable[[int], Any], limit: int = 60
                ) -> tuple[list[tuple[int, Any]], int]:
    """Run `args` killed before file-system change 1, 2, ... until it completes; `after(n)` after each kill.
    Returns [(n, after(n))] and the exit code of the run that was not killed (0 when it completed)."""
    points = []
    for n in range(1, limit + 1):
        code = crash_at(args, cwd, n)
        if code != 137:
            return points, code
        points.append((n, after(n)))
    return points, 0


def stale_cleanup(argv: Sequence[str], out: str) -> Callable[[Ctx, Case], tuple]:
    """Kill `argv` at the point that leaves the most behind (temp copies beside the output), then run it to the
    end: the next write must remove what the killed writer left."""
    def runner(ctx: Ctx, case: Case) -> tuple[str, str, str]:
        target = Path(ctx.fmt(out))
        args = [ctx.fmt(a) for a in argv]
        points, code = kill_points(args, ctx.d, lambda n: len(leftovers(target)))
        if code not in (0, 137) or not points:
            return "traceback", f"the writer failed (exit code {code}) without a crash", ""
        worst = max(points, key=lambda p: p[1])[0]
        crash_at(args, ctx.d, worst)
        stale = leftovers(target)
        run = call_forked(args, ctx.d)
        if run.rc != 0:
            return "traceback" if run.exc else "refused", run.exc or error_text(run.err), "the next write failed"
        left = leftovers(target)
        if left:
            return ("silently wrong", f"{len(left)} temp dir(s) left beside the output after the next write",
                    f"a writer killed before change #{worst} left {stale}")
        return "ok", f"the next write removed the {len(stale)} temp dir(s) left by a writer killed at #{worst}", ""
    return runner


def patch_state(old: str, new: str) -> State:
    """'old' / 'new' for a complete patch whose weights' sha256 is `old` / `new`; else what is wrong."""
    def state(p: Path) -> str:
        if not p.exists():
            return "absent"
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "patch.json")
                   if not (p / f).exists()]
        if missing:
            return f"partial (no {', '.join(missing)})"
        have = sha256(p / "adapter_model.safetensors")
        try:
            recorded = json.loads((p / "patch.json").read_text())["weights"]["sha256"]
        except (ValueError, KeyError, TypeError):
            return "partial (patch.json unreadable)"
        if have != recorded:
            return "inconsistent (weights do not match patch.json)"
        return {old: "old", new: "new"}.get(have, "another output")
    return state


def files_state(files: Sequence[str], old: str, new: str, key: str) -> State:
    """'old' / 'new' for a directory (or a file, `files` empty) holding `files`, by the sha256 of `key`."""
    def state(p: Path) -> str:
        if not p.exists():
            return "absent"
        missing = [f for f in files if not (p / f).exists()]
        if missing:
            return f"partial (no {', '.join(missing)})"
        have = sha256(p / key if key else p)
        return {old: "old", new: "new"}.get(have, "another output")
    return state


def reference(ctx: Ctx, argv: Sequence[str], out: Path, key: str) -> str:
    """The sha256 of `key` in the output of `argv` run to the end into `out` (a reference output)."""
    run = call_forked([ctx.fmt(a) for a in argv], ctx.d)
    if run.rc != 0:
        raise RuntimeError(f"reference run failed: {' '.join(argv)}: {run.exc or error_text(run.err)}")
    return sha256(out / key if key else out)


def resume_after_kill(argv: Sequence[str], limit: int = 40) -> Callable[[Ctx, Case], tuple]:
    """Kill `train` before each file-system change in turn, then `--resume`: the patch must be the one an
    uninterrupted run writes (same weights' sha256) and train_log.jsonl must not repeat steps."""
    def runner(ctx: Ctx, case: Case) -> tuple[str, str, str]:
        want = sha256(ctx.patch / "adapter_model.safetensors")
        args = [ctx.fmt(a) for a in argv]
        problems: list[str] = []
        n = 0
        for n in range(1, limit + 1):
            run_dir = ctx.d / "run"
            shutil.rmtree(run_dir, ignore_errors=True)
            if crash_at(args, ctx.d, n) != 137:
                break
            problems += resume_problems(ctx, args, run_dir, want, n)
        if problems:
            kind = "traceback" if any("raised" in p for p in problems) else "silently wrong"
            return kind, problems[0], f"{len(problems)} problem(s) over {n - 1} kill points"
        return "ok", f"killed at each of {n - 1} points, resumed to the same patch, no repeated log steps", ""
    return runner


def resume_problems(ctx: Ctx, args: Sequence[str], run_dir: Path, want: str, n: int) -> list[str]:
    run = call_forked([*args, "--resume"], ctx.d)
    if run.exc:
        return [f"#{n}: --resume raised {run.exc}"]
    patch = run_dir / "patch" / "adapter_model.safetensors"
    if run.rc != 0 and not patch.exists():
        return [f"#{n}: --resume refused: {error_text(run.err).splitlines()[0] if run.err else run.rc}"]
    out = []
    if not patch.exists() or sha256(patch) != want:
        out.append(f"#{n}: the resumed patch differs from an uninterrupted run's")
    log = run_dir / "train_log.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    if len(steps) != len(set(steps)):
        out.append(f"#{n}: train_log.jsonl repeats steps {sorted({s for s in steps if steps.count(s) > 1})}")
    return out
