"""Local path or hub id? One rule for `--data` / `--prompts` / `--benign` and `--model`.

A value that does not exist locally is tried on the hub only when it has the hub's form `org/name` (a data set may
add `:split`) and nothing about it says "local path": it does not start with `.`, `/`, `~` or `\\`, it has no file
suffix of a local file (`.jsonl`, `.csv`, `.gguf`, ...), and its first component is not a directory here
(`data/nope` with a `data/` folder present is a missing file, not a hub id: a typo is reported at once instead of
after the hub client's retries).
"""

from __future__ import annotations

import re
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".yaml", ".yml", ".gz", ".zip")
MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def path_exists(p: Path) -> bool:
    """Path.exists that answers False for a name the OS cannot even look up (too long, a NUL byte, ...)."""
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def is_directory(p: Path) -> bool:
    return path_exists(p) and p.is_dir()


def looks_like_hub_id(spec: str, suffixes: tuple[str, ...], split: bool = False) -> bool:
    """Whether a value that is not a local path should be tried as a hub id (see the module doc); `split`: a
    data set id may end in `:split`."""
    name = spec.partition(":")[0] if split else spec
    if not HUB_ID.match(name) or name.startswith((".", "/", "~", "\\")):
        return False
    if name.lower().endswith(suffixes):
        return False
    return not is_directory(Path(name.split("/")[0]))


def shipped_or_path(spec: str, directory: Path, kind: str, error: type[Exception]) -> Path:
    """A YAML file shipped in `directory` by name (`quick` -> DIR/quick.yaml), or a YAML file by path; `error`
    (naming the file, or the shipped names) when neither exists. `kind`: 'suite', 'sweep', ..."""
    p = Path(spec).expanduser()
    if p.suffix in (".yaml", ".yml") or path_exists(p):
        if not (path_exists(p) and p.is_file()):
            raise error(f"{p}: no such {kind} file{missing_path_hint(spec)}")
        return p
    shipped = directory / f"{spec}.yaml"
    if not shipped.exists():
        names = ", ".join(sorted(f.stem for f in directory.glob("*.yaml")))
        raise error(f"unknown {kind} '{spec}'; shipped {kind}s: {names} (or a path to a .yaml)")
    return shipped


def missing_path_hint(spec: str) -> str:
    """Why a missing value was taken as a local path, for the error message."""
    first = str(spec).split("/")[0]
    if "/" in str(spec) and first not in ("", ".", "..", "~") and is_directory(Path(first).expanduser()):
        return f" (the folder '{first}' exists here, so this is read as a local path)"
    return ""
