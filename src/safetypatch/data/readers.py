"""Reading prompt/response pairs or chat `messages` from JSONL, JSON, CSV, TSV, Parquet or a hub dataset id.

Every bad row is a `DataError` naming the file, the line (1-based, as an editor shows it) and the field. Text files
are UTF-8 with or without a BOM (`data.text`); one that is not is a DataError naming the file, line and encoding, and
so is JSON that spells no text (an unpaired surrogate escape), a number too long to convert or nesting too deep. A
missing local path is reported as missing, not tried on the hub (`data.paths`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from .paths import DATA_SUFFIXES, looks_like_hub_id, missing_path_hint, path_exists
from .text import check_json_unicode, open_text, read_text


@dataclass
class Record:
    """One example: a prompt (or earlier chat turns) and, for training data, the response to learn."""

    prompt: str
    response: str | None = None
    messages: list[dict[str, str]] | None = None  # chat turns before the response, when given as `messages`
    meta: dict[str, Any] = field(default_factory=dict)

    def chat(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the response, as chat-template messages."""
        return list(self.messages) if self.messages else [{"role": "user", "content": self.prompt}]


def _json_value(text: str, where: str, whole_file: bool = False) -> Any:
    """One parsed JSON value (a JSONL line, or a whole file whose errors then name their line); a syntax error, a
    number too long to convert or nesting too deep is a DataError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        line = f":{e.lineno}" if whole_file else ""
        raise DataError(f"{where}{line}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of over 4300 digits, or [[[[...]]]] nested too deep
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise DataError(f"{where}: not usable JSON ({why})") from None
    check_json_unicode(text, value, where)
    return value


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            yield lineno, _json_value(line, f"{path}:{lineno}")


def _rows_json(path: Path) -> Iterator[tuple[int, Any]]:
    data = _json_value(read_text(path), str(path), whole_file=True)
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or one object holding a single list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    for i, row in enumerate(data):
        yield i + 1, row  # 'line' is the row number for a JSON list


def _rows_csv(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV (or, for .tsv, tab-separated) file with a header line; a row with more fields than the header
    is an error (an unquoted comma would otherwise cut a prompt silently)."""
    tsv = path.suffix.lower() == ".tsv"
    with open_text(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",")
        try:
            if not reader.fieldnames:
                return
            for row in reader:
                if None in row:  # DictReader files surplus values under the key None
                    raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields but "
                                    f"the header names {len(reader.fieldnames)}; quote a field that holds a "
                                    + ("tab" if tsv else "','"))
                # line_num is the physical line where this row ended (multi-line quoted fields count)
                yield reader.line_num, row
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({e}); an unclosed quote makes the rest "
                            "of the file one field: close it (fields over 131072 characters need JSONL)") from None


def _rows_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield i + 1, row


def _rows_hub(spec: str) -> Iterator[tuple[int, Any]]:
    """`org/name` or `org/name:split` (default split 'train'), through `datasets.load_dataset`."""
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, auth or not-found: say which dataset and how to work offline
        raise DataError(f"{spec}: could not load hub dataset ({type(e).__name__}: {e}); pass a local file instead") from None
    for i, row in enumerate(ds):
        yield i + 1, row


def iter_rows(source: str | Path) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(display name, iterator of (line, row dict)) for a file path or a hub dataset id (`org/name[:split]`; a
    missing local path is reported as missing, see `data.paths`)."""
    p = Path(source).expanduser()
    if path_exists(p):
        if p.is_dir():
            raise DataError(f"{p}: is a directory; pass a .jsonl, .json, .csv, .tsv or .parquet file")
        suffix = "".join(p.suffixes[-1:]).lower()
        readers = {".jsonl": _rows_jsonl, ".ndjson": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv,
                   ".tsv": _rows_csv, ".parquet": _rows_parquet}
        if suffix not in readers:
            raise DataError(f"{p}: unknown file type '{suffix}'; use .jsonl, .json, .csv, .tsv or .parquet")
        return str(p), readers[suffix](p)
    s = str(source)
    if looks_like_hub_id(s, DATA_SUFFIXES, split=True):
        return s, _rows_hub(s)
    raise DataError(f"{source}: no such file{missing_path_hint(s)}; check the path, or give a hub dataset id as "
                    "'org/name[:split]'")


def iter_objects(source: str | Path, expected: str) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """Like `iter_rows`, for a data source whose rows must be objects: a row that is not one is a DataError naming
    the file, the line and what the row should hold (`expected`)."""
    name, rows = iter_rows(source)

    def objects() -> Iterator[tuple[int, dict[str, Any]]]:
        for line, row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{name}:{line}: expected an object with {expected}, got {type(row).__name__}")
            yield line, row

    return name, objects()


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # a CSV cell holding JSON
        raw = value
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            raise DataError(f"{where}: field 'messages' is not a JSON list of {{role, content}}") from None
        check_json_unicode(raw, value, f"{where}: field 'messages'")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
            "system", "user", "assistant"):
            raise DataError(f"{where}: field 'messages[{i}]' needs role in system/user/assistant and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_records(
    source: str | Path,
    prompt_field: str = "prompt",
    response_field: str | None = "response",
    require_response: bool = False,
    limit: int | None = None,
) -> list[Record]:
    """Read records, mapping fields; a row with `messages` becomes a chat whose last assistant turn is the response.

    Raises DataError naming the file, line and field for a missing or empty field, and for an empty file.
    """
    name, rows = iter_objects(source, f"field '{prompt_field}'")
    out: list[Record] = []
    for line, row in rows:
        where = f"{name}:{line}"
        meta = {k: v for k, v in row.items() if k not in (prompt_field, response_field, "messages")
                and isinstance(v, (str, int, float, bool))}
        if "messages" in row and prompt_field not in row:
            msgs = _messages(row["messages"], where)
            response = None
            if msgs[-1]["role"] == "assistant":
                response = msgs.pop()["content"]
            if not msgs or msgs[-1]["role"] != "user":
                raise DataError(f"{where}: field 'messages' must end with a user turn (then optionally the assistant's)")
            if require_response and not response:
                raise DataError(f"{where}: field 'messages' has no final assistant turn to learn")
            out.append(Record(prompt=msgs[-1]["content"], response=response, messages=msgs, meta=meta))
        else:
            if prompt_field not in row:
                cols = ", ".join(map(str, row.keys()))
                raise DataError(f"{where}: missing field '{prompt_field}' (columns: {cols}); "
                                "set --prompt-field to the column holding the prompt")
            prompt = row[prompt_field]
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{where}: field '{prompt_field}' is empty or not text")
            response = None
            if response_field and response_field in row and row[response_field] is not None:
                response = row[response_field]
                if not isinstance(response, str) or not response.strip():
                    if require_response or not isinstance(response, str):
                        raise DataError(f"{where}: field '{response_field}' is empty or not text")
                    response = None  # an empty optional cell (CSV) is no response
            if require_response and response is None:
                raise DataError(f"{where}: missing field '{response_field}'; "
                                "set --response-field to the column holding the response")
            out.append(Record(prompt=prompt.strip(), response=response, meta=meta))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{name}: no rows (empty file?)")
    return out


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON lines through a temp file, fsync and rename: readers never see a half file."""
    from ..io_utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
