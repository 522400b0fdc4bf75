"""Atomic file writes, locks, and outputs that are never lost.

A directory output (a patch, a merged model, an exported adapter) is written only through `staged_dir`, a file
output (a GGUF adapter) through `staged_file`. The output is claimed with a lock `.NAME.lock` beside it (`flock`: the
kernel drops the lock of a process that dies, so one a killed writer left is taken over), so a second writer gets
`OutputExistsError` instead of silently replacing the first one's result; what killed writers left beside it (temp
copies `.NAME.xxxxxxxx`, old copies renamed aside `.NAME.old-xxxxxxxx`) is removed; an existing output is refused
unless `overwrite`, a file where a directory goes always. The new copy is built beside the output, fsynced, given the
modes the umask gives, and swapped in atomically (`renameat2(RENAME_EXCHANGE)`, `os.replace` for a file) before the
old copy is removed: a crash at any point leaves the old output or the new one, never neither, never a half one.
`update_json` is the locked read-modify-write of a JSON file (patch.json's certificate): none is lost.
Run directories (`claim_output_dir`) hold a run's files as they are written and can be resumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .errors import OutputExistsError

try:
    import fcntl
except ImportError:  # not a POSIX system: outputs are still atomic, but concurrent writers are not detected
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


def fsync_dir(path: Path | int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY) if not isinstance(path, int) else os.dup(path)
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
    atomic_write_text(path, json_bytes(obj).decode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """`obj` as the JSON text every safetypatch file uses (indent 2, UTF-8, newline at the end)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")


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


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ locks
def _open_lock(name: str | Path, dir_fd: int | None) -> int:
    try:
        return os.open(name, os.O_RDWR | os.O_CREAT, 0o666, dir_fd=dir_fd)
    except PermissionError:  # another user's lock file: flock works on a read-only descriptor too
        return os.open(name, os.O_RDONLY, dir_fd=dir_fd)


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 100, 0).decode("utf-8", "replace").strip() or "pid unknown"
    except OSError:
        return "pid unknown"


def _same_file(fd: int, name: str | Path, dir_fd: int | None) -> bool:
    try:
        now = os.stat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def file_lock(name: str | Path, blocking: bool = True, what: str | None = None,
              dir_fd: int | None = None) -> Iterator[None]:
    """An exclusive lock on the lock file `name` (created if missing, removed when done; relative to `dir_fd` when
    given). A lock whose holder died is free (the kernel drops it), so a lock file a killed process left behind is
    taken over. `blocking=False`: OutputExistsError naming `what` and the holder's pid instead of waiting."""
    if fcntl is None:
        yield
        return
    while True:
        fd = _open_lock(name, dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputExistsError(f"{what or name} is being written by another process ({holder}); wait for it to "
                                    "finish, or choose another output") from None
        except OSError as e:  # a filesystem without flock: go on without the lock rather than refuse every write
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, name, dir_fd):  # else its holder removed it as we opened it: take the new one
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        os.close(fd)


def lock_path(out: str | Path) -> Path:
    """The lock file that claims the output `out`: `.NAME.lock` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def output_lock(out: str | Path) -> contextlib.AbstractContextManager[None]:
    """Claim the output `out` for this process: OutputExistsError if another live process is writing it."""
    return file_lock(lock_path(out), blocking=False, what=str(out))


# ------------------------------------------------------------------------------------------------ stale files
def stale_pattern(name: str) -> re.Pattern[str]:
    """Names of what a writer of `name` leaves beside it while it works: `.NAME.xxxxxxxx` (the temp copy, as
    `tempfile` names it) and `.NAME.old-xxxxxxxx` (the old copy renamed aside)."""
    return re.compile(rf"\.{re.escape(name)}\.(?:old-)?[a-z0-9_]{{8}}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(out: str | Path) -> list[Path]:
    """Remove what killed writers of `out` left beside it; call with `out`'s lock held (then no live writer owns
    them). An old copy renamed aside whose replacement never arrived (no `out`) is put back. Returns the removed."""
    out = Path(out)
    pattern = stale_pattern(out.name)
    try:
        found = sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for p in found:
        if p.name.startswith(f".{out.name}.old-") and not os.path.lexists(out):
            os.rename(p, out)
            continue
        _remove(p)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------ outputs
def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputExistsError(f"cannot write {out}: a file is in the way of its folder {out.parent}; choose "
                                "another output") from None


def check_output(out: Path, overwrite: bool, kind: str = "dir") -> None:
    """OutputExistsError if `out` is taken: a file where a directory goes (or the reverse), or an existing output
    (a non-empty directory, a file) without `overwrite`."""
    if kind == "dir" and out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a directory; choose another output directory (or remove the "
                                "file)")
    if kind == "file" and out.is_dir():
        raise OutputExistsError(f"{out} is a directory; name an output file")
    taken = out.exists() and (kind == "file" or any(out.iterdir()))
    if taken and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another output, or pass --overwrite to replace it")


def _finish_tree(tmp: Path) -> None:
    """fsync every file under `tmp` and give files and folders the modes the umask gives (mkdtemp makes 0700)."""
    mask = _umask()
    for f in [tmp, *tmp.rglob("*")]:
        if f.is_symlink():
            continue
        if f.is_dir():
            os.chmod(f, 0o777 & ~mask)
            continue
        os.chmod(f, 0o666 & ~mask)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_dir(tmp: Path, out: Path) -> None:
    """Make the complete directory `tmp` the output `out`: fsync and set its modes, then swap it with an existing
    `out` atomically (`exchange`) and remove the old copy only after. Where no exchange exists: old renamed aside,
    new renamed in, old removed (a crash between the renames leaves the old aside; `clean_stale` puts it back)."""
    _finish_tree(tmp)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    old = tmp
    if not exchange(tmp, out):
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
    fsync_dir(out.parent)
    _remove(old)


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """The one way a directory output is written: build it in a temp dir beside `out`, then commit it.

        with staged_dir(out, overwrite) as tmp:
            write files into tmp
    Under `out`'s lock (a concurrent writer gets OutputExistsError), after removing what killed writers left; an
    existing non-empty `out` is refused unless `overwrite`. If the block raises, nothing is committed and the temp
    dir is removed; committing swaps the new copy in atomically (see `commit_dir`)."""
    out = Path(out)
    _make_parent(out)
    with output_lock(out):
        clean_stale(out)
        check_output(out, overwrite, "dir")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            yield tmp
            commit_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`staged_dir` for one file: yields a temp file path beside `out` to write; committed with one os.replace."""
    out = Path(out)
    _make_parent(out)
    with output_lock(out):
        clean_stale(out)
        check_output(out, overwrite, "file")
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _finish_tree(tmp)
            os.replace(tmp, out)
            fsync_dir(out.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


# ------------------------------------------------------------------------------------------------ JSON updates
def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    """Atomically replace `name` in the directory `dir_fd` with `data` (temp file, fsync, rename)."""
    tmp = f".{name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)  # mode: 0666 less the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def update_json(path: str | Path, change: Callable[[Any], T], parse: Callable[[bytes], Any] = json.loads) -> T:
    """Read-modify-write the JSON file `path` under an exclusive lock (`.NAME.lock` beside it), written atomically:
    concurrent updates are serialised and none is lost. `parse` turns the file's bytes into the object (raising the
    caller's error for a damaged file); `change` edits it in place and its result is returned. Everything happens
    in the directory as opened first, so a directory replaced meanwhile is never written with the old contents."""
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with file_lock(f".{path.name}.lock", blocking=True, dir_fd=dir_fd):
            pattern = stale_pattern(path.name)
            for stale in os.listdir(dir_fd):
                if pattern.fullmatch(stale):
                    with contextlib.suppress(IsADirectoryError, PermissionError, FileNotFoundError):
                        os.unlink(stale, dir_fd=dir_fd)
            fd = os.open(path.name, os.O_RDONLY, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                obj = parse(f.read())
            result = change(obj)
            _write_at(dir_fd, path.name, json_bytes(obj))
            return result
    finally:
        os.close(dir_fd)


def claim_output_dir(path: str | Path, resume: bool = False, marker: str | None = None) -> Path:
    """Create `path` for a new run, or accept an existing one only with `resume`.

    With `marker`, an existing directory counts as taken only if that file is in it (partial runs can resume).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"{p} is a file, not a directory; choose another --out (or remove the file)")
    if p.exists() and any(p.iterdir()):
        taken = (p / marker).exists() if marker else True
        if taken and not resume:
            raise OutputExistsError(
                f"{p} already holds results; choose another --out, or pass --resume to continue that run"
            )
    _make_parent(p)
    p.mkdir(parents=True, exist_ok=True)
    return p
