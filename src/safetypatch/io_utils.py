"""Atomic file writes and run directories that never overwrite existing results."""

from __future__ import annotations

import hashlib
import json
import contextlib
import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator
from .errors import OutputExistsError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()




def claim_output_dir(path: str | Path, resume: bool = False, marker: str | None = None) -> Path:
    """Create `path` for a new run, or accept an existing one only with `resume`.

    With `marker`, an existing directory counts as taken only if that file is in it (partial runs can resume).
    """
    p = Path(path)
    if p.exists() and any(p.iterdir()):
        taken = (p / marker).exists() if marker else True
        if taken and not resume:
            raise OutputExistsError(
                f"{p} already holds results; choose another --out, or pass --resume to continue that run"
            )
    p.mkdir(parents=True, exist_ok=True)
    return p


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def claim_tmp_dir(out: Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty `out` (unless `overwrite`); return a fresh temp dir beside it to build the output in."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def commit_dir(tmp: Path, out: Path) -> None:
    """fsync every file in `tmp`, then rename it to `out` (replacing an existing `out`): never a half directory."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    fsync_dir(out.parent)


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory output in a temp dir beside `out`, then commit it in one rename (see `commit_dir`).

        with staged_dir(out, overwrite) as tmp:
            write files into tmp
    An existing non-empty `out` is refused unless `overwrite`; if the block raises, nothing is committed and the
    temp dir is removed."""
    out = Path(out)
    tmp = claim_tmp_dir(out, overwrite)
    try:
        yield tmp
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
