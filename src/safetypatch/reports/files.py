"""Reading the JSON files a report is made from, with errors that name the file, line and field
(`ConfigError`: printed as one `error: ...` line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DAMAGED = "the file is damaged or was cut short: rerun the command that wrote it, or leave this run out"


def read_json(path: Path) -> Any:
    """The JSON value of `path`; ConfigError naming the file when it is missing, unreadable or not JSON."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; {DAMAGED}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); {DAMAGED}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {DAMAGED}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a safetypatch file; {DAMAGED}") from None


def read_object(path: Path) -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds a JSON {type(value).__name__}, expected an object; {DAMAGED}")
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped); ConfigError naming file and line for a bad one."""
    rows = []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); {DAMAGED}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg}); {DAMAGED}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{lineno}: a JSON {type(row).__name__}, expected an object; {DAMAGED}")
        rows.append(row)
    return rows


def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str | Path) -> Any:
    """`obj[key]`, which must be present and of `kind`; ConfigError naming the file and the field otherwise."""
    if key not in obj:
        raise ConfigError(f"{where}: field '{key}' is missing; {DAMAGED}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"{where}: field '{key}' is a {type(value).__name__}, expected {names}; {DAMAGED}")
    return value


def optional(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str | Path,
             default: Any = None) -> Any:
    """`need`, except that a missing or null field gives `default`."""
    if obj.get(key) is None:
        return default
    return need(obj, key, kind, where)
