"""Outputs are never lost (issue 16): an existing output is refused unless --overwrite; replacing one swaps the new
copy in before the old one is removed; concurrent writers to one output: exactly one wins; what killed writers left
beside an output is removed by the next write; outputs get the umask's modes; a file in the way is a clear error."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from safetypatch import io_utils
from safetypatch.cli import main
from safetypatch.errors import OutputExistsError
from safetypatch.io_utils import claim_output_dir, staged_dir

FORK = multiprocessing.get_context("fork")


def _write(out: Path, text: str, overwrite: bool = False) -> None:
    with staged_dir(out, overwrite) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)


def _contents(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.iterdir())}


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _write(out, "new")
    assert _contents(out) == {"a.txt": "old", "b.txt": "old"}
    _write(out, "new", overwrite=True)
    assert _contents(out) == {"a.txt": "new", "b.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp, aside copy or lock left


def test_replacing_never_leaves_no_output(tmp_path, monkeypatch):
    """The old commit removed OUT, then renamed the new copy in: a crash between the two left neither. Here the
    rename fails at that moment (as a crash would stop it): OUT still holds the old copy or the new one."""
    out = tmp_path / "out"
    _write(out, "old")

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "rename", crash)
    try:
        _write(out, "new", overwrite=True)
    except OSError:
        pass
    monkeypatch.undo()
    assert out.is_dir() and _contents(out) in ({"a.txt": "old", "b.txt": "old"}, {"a.txt": "new", "b.txt": "new"})


def test_without_atomic_exchange_the_old_copy_is_put_back(tmp_path, monkeypatch):
    """Where renameat2 is missing: old renamed aside, new renamed in, old removed. A crash after the first rename
    leaves the old copy aside; the next write to OUT puts it back (and, without --overwrite, keeps it)."""
    out = tmp_path / "out"
    _write(out, "old")
    monkeypatch.setattr(io_utils, "exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_second(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError("killed between the renames")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        _write(out, "new", overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and [p.name for p in tmp_path.glob(".out.old-*")]
    with pytest.raises(OutputExistsError):
        _write(out, "newer")
    assert _contents(out) == {"a.txt": "old", "b.txt": "old"}
    _write(out, "newer", overwrite=True)  # the fallback path completes too
    assert _contents(out) == {"a.txt": "newer", "b.txt": "newer"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _hold(out: Path, entered, release) -> None:
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
        entered.set()
        release.wait(30)


def test_concurrent_writers_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    entered, release = FORK.Event(), FORK.Event()
    first = FORK.Process(target=_hold, args=(out, entered, release))
    first.start()
    try:
        assert entered.wait(30)
        with pytest.raises(OutputExistsError, match=r"being written by another process \(pid \d+\)"):
            _write(out, "second", overwrite=True)
    finally:
        release.set()
        first.join(30)
    assert first.exitcode == 0 and _contents(out) == {"a.txt": "first"}


def test_lock_of_a_dead_writer_is_taken_over(tmp_path):
    out = tmp_path / "out"
    child = FORK.Process(target=lambda: None)
    child.start()
    child.join()
    (tmp_path / ".out.lock").write_text(f"pid {child.pid}\n")  # left by a writer killed with SIGKILL
    _write(out, "new")
    assert _contents(out) == {"a.txt": "new", "b.txt": "new"} and not (tmp_path / ".out.lock").exists()


def test_next_write_removes_what_killed_writers_left(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    for stale in (".out.k2j4_x9a", ".out.old-0a1b2c3d"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".out.lock").write_text("pid 999999999\n")
    keep = [tmp_path / ".out.keep", tmp_path / ".outer.abcdefgh", tmp_path / "out.abcdefgh"]  # not ours
    for k in keep:
        k.write_text("keep")
    _write(out, "new", overwrite=True)
    assert _contents(out) == {"a.txt": "new", "b.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(k.name for k in keep)])


def test_outputs_get_the_umask_modes(tiny_patch, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["patch", "scale", str(tiny_patch), "--factor", "2", "-o", str(tmp_path / "s")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "s", *(tmp_path / "s").iterdir()]}
    assert modes == {"s": 0o755, "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644,
                     "patch.json": 0o644}


def test_a_file_in_the_way_is_a_clear_error(tiny_patch, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    with pytest.raises(OutputExistsError, match="is a file"):
        _write(f, "new", overwrite=True)
    with pytest.raises(OutputExistsError, match="is a file"):
        claim_output_dir(f)
    with pytest.raises(OutputExistsError, match="in the way"):
        claim_output_dir(f / "run")
    assert main(["patch", "stack", str(tiny_patch), str(tiny_patch), "-o", str(f), "--overwrite"]) == 2
    assert main(["patch", "scale", str(tiny_patch), "--factor", "2", "-o", str(f / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "is a file" in err and "in the way" in err
    assert f.read_text() == "not a directory"


def test_gguf_export_is_claimed_like_a_directory_output(tiny_patch, tmp_path):
    out = tmp_path / "p.gguf"
    (tmp_path / ".p.gguf.abc123de").write_bytes(b"half a file")  # a killed export's temp file
    args = ["patch", "export", str(tiny_patch), "--format", "gguf", "-o", str(out), "--n-head", "4",
            "--n-head-kv", "2"]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".p.gguf")) == []
    first = out.read_bytes()
    assert main(args) == 2 and out.read_bytes() == first
    assert main([*args, "--overwrite"]) == 0
