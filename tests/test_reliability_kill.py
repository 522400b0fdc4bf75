"""Crash safety (issue 16): writers (`patch stack`, `patch merge`, `patch export` peft and gguf, `train` on the
tiny model) are killed with SIGKILL at random points, a few dozen times in all. After each kill the output is the
old one, the new one, or absent (when there was no old one), never partial: a patch directory with all its files
and a matching sha256, a merged model byte-identical to an uninterrupted run's (which loads), an adapter or GGUF
file as a complete run writes it. The next write removes what the killed writers left beside the output.

Each writer is a forked child of the test process (torch is already imported, so a run takes a fraction of a
second), killed after a random delay drawn around the length of an uninterrupted run. Two tqdm details of that
harness (not of safetypatch): its monitor thread is stopped before a fork (a lock it holds then would never be
released in the child), and each child drops tqdm's lock shared across processes (a child killed while holding it
would block every later progress bar of the test process).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from safetypatch.cli import main
from safetypatch.patches import verify_files

VOLATILE = ("patch.json", "merged_from.json")  # hold a timestamp: checked to be complete JSON, not compared


def _private_tqdm_lock() -> None:
    """In a forked child: stop using the multiprocessing lock tqdm shares with the parent and its other children."""
    from tqdm.std import TqdmDefaultWriteLock

    shared = getattr(TqdmDefaultWriteLock, "mp_lock", None)
    TqdmDefaultWriteLock.mp_lock = None
    for cls in _tqdm_classes():
        lock = vars(cls).get("_lock")
        if isinstance(lock, TqdmDefaultWriteLock):
            lock.locks = [lk for lk in lock.locks if lk is not shared]


def _tqdm_classes() -> list[type]:
    from tqdm.std import tqdm

    out, todo = [], [tqdm]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def _stop_tqdm_monitors() -> None:
    """In the test process, before a fork: no tqdm monitor thread (of tqdm or any subclass) runs, or starts."""
    for cls in _tqdm_classes():
        cls.monitor_interval = 0
        monitor = vars(cls).get("monitor")
        if monitor is not None:
            monitor.exit()
            cls.monitor = None


def _child(argv: list[str]) -> None:
    """In the forked child: run the command quietly and exit with its status, never returning to pytest."""
    rc = 3
    try:
        import torch

        _private_tqdm_lock()
        torch.set_num_threads(1)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        rc = main(argv)
    except BaseException:  # noqa: BLE001 - any failure is reported through the exit status
        rc = 4
    finally:
        os._exit(rc)


def start(argv: list[str]) -> int:
    """Fork a child that runs `argv`; returns its pid."""
    _stop_tqdm_monitors()
    pid = os.fork()
    if pid == 0:
        _child(argv)
    return pid


def finish(pid: int, t0: float, kill_after: float | None = None, limit: float = 120.0) -> int:
    """Wait for the child (SIGKILL it `kill_after` seconds after `t0`); its exit status (-9 when killed)."""
    deadline = t0 + (kill_after if kill_after is not None else limit)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            assert kill_after is not None, f"a child did not finish within {limit} s"
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)


def run(argv: list[str], kill_after: float | None = None) -> tuple[int, float]:
    """Run `argv` in a forked child; with `kill_after`, SIGKILL it then. Returns (exit status, seconds)."""
    t0 = time.monotonic()
    rc = finish(start(argv), t0, kill_after)
    return rc, time.monotonic() - t0


def hashes(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (or of `path` itself, a file); volatile JSON files are
    parsed (a half-written one fails) and left out."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            if f.name in VOLATILE:
                json.loads(f.read_text())
                continue
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def state(out: Path, old: dict[str, str] | None, new: dict[str, str]) -> str:
    """'absent', 'old' or 'new'; AssertionError for anything else (a partial or mixed output)."""
    if not os.path.lexists(out):
        assert old is None, f"{out}: the old output was lost"
        return "absent"
    have = hashes(out)
    if have == new:
        return "new"
    assert have == old, f"{out}: partial output {sorted(have)}"
    return "old"


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def put(old_copy: Path | None, out: Path) -> None:
    """Reset `out` to the old output (or to nothing), leaving whatever killed writers left beside it."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    if old_copy is not None:
        (shutil.copytree if old_copy.is_dir() else shutil.copy2)(old_copy, out)


def kill_trials(argv: list[str], out: Path, old_copy: Path, trials: int, rng: random.Random) -> dict[str, int]:
    """An uninterrupted run (the reference), then `trials` killed runs over the old output or over nothing, then
    one more complete run: it must leave nothing beside the output."""
    put(None, out)
    rc, seconds = run(argv)
    assert rc == 0, argv
    new = hashes(out)
    old = hashes(old_copy)
    assert old != new
    seen = {"absent": 0, "old": 0, "new": 0, "killed": 0}
    for i in range(trials):
        before = old_copy if i % 3 else None
        put(before, out)
        rc, _ = run(argv, kill_after=rng.uniform(0.2, 1.1) * seconds)
        seen["killed"] += rc == -signal.SIGKILL
        assert rc in (0, -signal.SIGKILL), (argv, rc)
        seen[state(out, old if before else None, new)] += 1
    put(old_copy, out)
    assert run(argv)[0] == 0
    assert state(out, None, new) == "new" and leftovers(out) == []
    return seen


@pytest.fixture()
def parts(tiny_patch, tmp_path):
    """Two patches for the tiny model, and old outputs to be replaced (made by the same commands, other inputs)."""
    q = tmp_path / "q"
    assert main(["patch", "scale", str(tiny_patch), "--factor", "-0.5", "-o", str(q)]) == 0
    return tiny_patch, q


def test_killed_stack_and_export_leave_old_new_or_nothing(parts, tmp_path):
    p, q = parts
    rng = random.Random(16)
    old = tmp_path / "old-stack"
    assert main(["patch", "stack", str(p), str(q), "--weights", "2,1", "-o", str(old)]) == 0
    out = tmp_path / "stacked"
    seen = kill_trials(["patch", "stack", str(p), str(q), "--weights=-1,1", "-o", str(out), "--overwrite"], out, old,
                       10, rng)
    verify_files(out)
    old_peft = tmp_path / "old-peft"
    assert main(["patch", "export", str(q), "--format", "peft", "-o", str(old_peft)]) == 0
    out = tmp_path / "exported"
    seen_peft = kill_trials(["patch", "export", str(p), "--format", "peft", "-o", str(out), "--overwrite"], out,
                            old_peft, 6, rng)
    old_gguf = tmp_path / "old.gguf"
    gguf = ["--format", "gguf", "--n-head", "4", "--n-head-kv", "2", "--overwrite"]
    assert main(["patch", "export", str(q), *gguf, "-o", str(old_gguf)]) == 0
    out = tmp_path / "exported.gguf"
    seen_gguf = kill_trials(["patch", "export", str(p), *gguf, "-o", str(out)], out, old_gguf, 6, rng)
    total = {k: seen[k] + seen_peft[k] + seen_gguf[k] for k in seen}
    assert total["killed"] >= 5, total  # most runs were really cut off


def test_killed_merge_leaves_old_new_or_nothing(parts, tiny_model_dir, tmp_path):
    from safetypatch.modeling.loading import load_model

    p, q = parts
    old = tmp_path / "old-merged"
    assert main(["patch", "merge", str(q), "--model", str(tiny_model_dir), "-o", str(old)]) == 0
    out = tmp_path / "merged"
    seen = kill_trials(["patch", "merge", str(p), "--model", str(tiny_model_dir), "-o", str(out), "--overwrite"],
                       out, old, 8, random.Random(21))
    assert seen["killed"] >= 2, seen
    load_model(str(out))  # the merged model loads
    assert json.loads((out / "merged_from.json").read_text())["patch"]["sha256"] == verify_files(p)["weights"]["sha256"]


def test_killed_training_leaves_a_complete_patch_or_none(tiny_model_dir, harmful_file, benign_file, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(harmful_file), "--benign", str(benign_file),
            "--rank", "2", "--alpha", "8", "--target-modules", "up_proj", "--layers", "all", "--lr", "5e-3",
            "--epochs", "1", "--batch-size", "4", "--dev-size", "2", "--dev-tokens", "2", "--anchor-tokens", "4",
            "--bf16", "no", "--eval-every", "0", "--out", str(run_dir), "--resume"]
    rc, seconds = run(argv)
    assert rc == 0
    shutil.rmtree(run_dir)
    rng = random.Random(5)
    outcomes = []
    for _ in range(6):
        rc, _ = run(argv, kill_after=rng.uniform(0.3, 1.1) * seconds)
        patch = run_dir / "patch"
        if patch.exists():
            verify_files(patch)  # all files, sha256 as recorded
            outcomes.append("new")
            break
        outcomes.append("absent")
    if not (run_dir / "patch").exists():
        assert run(argv)[0] == 0  # resumes to the end
    verify_files(run_dir / "patch")
    # the resumed runs removed what the killed ones left; a lock file survives only a kill after the last commit
    # (its holder is dead, so the next writer takes it over)
    assert set(leftovers(run_dir / "patch")) <= {".patch.lock"}, outcomes


def test_two_writers_to_one_output_exactly_one_wins(parts, tiny_model_dir, tmp_path):
    """Two `patch stack` (and two `patch merge`) runs to the same -o at once: one writes, the other exits 2
    (the output is being written, or already exists); before, both exited 0 and one result replaced the other."""
    p, q = parts
    for i in range(3):
        for cmd in (["patch", "stack", str(p), str(q)], ["patch", "merge", str(p), "--model", str(tiny_model_dir)]):
            out = tmp_path / f"{cmd[1]}-{i}"
            t0 = time.monotonic()
            pids = [start([*cmd, "-o", str(out)]) for _ in range(2)]
            assert sorted(finish(pid, t0) for pid in pids) == [0, 2], cmd
            assert leftovers(out) == []
    verify_files(tmp_path / "stack-0")
