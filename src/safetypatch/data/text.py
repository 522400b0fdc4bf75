"""Reading a user's text file: UTF-8, with or without a byte-order mark (Excel and Notepad write one).

A file that is not UTF-8 is an error naming the file, the line, the column and the encoding, and a file that cannot
be opened an error naming the file and why; never a `UnicodeDecodeError` or `OSError` traceback. The caller picks
the error class (`DataError` for data, `SuiteError` for a suite file, ...). Lines and columns are 1-based, as an
editor shows them; the column counts bytes.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from ..errors import DataError, SafetypatchError

ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is dropped
BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\(u|U0000)[dD][89a-fA-F]")  # a JSON / YAML escape that may be an unpaired surrogate


def not_utf8(path: str | Path, error: type[SafetypatchError] = DataError) -> SafetypatchError:
    """The error for a file that does not decode as UTF-8: where the first bad byte is, and how to fix it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # a newline byte never occurs inside a UTF-8 multi-byte sequence
            if lineno == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    return error(f"{path}:1: the file is UTF-16 (it starts with a UTF-16 byte-order mark), not "
                                 "UTF-8; save it as UTF-8")
                start = len(BOM) if raw.startswith(BOM) else 0
            else:
                start = 0
            try:
                raw[start:].decode("utf-8")
            except UnicodeDecodeError as e:
                col = start + e.start + 1
                return error(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[start + e.start]:02x} at column {col} "
                             "is not valid UTF-8); save the file as UTF-8 (with or without a BOM)")
    return error(f"{path}: not UTF-8 text; save the file as UTF-8 (with or without a BOM)")


def unreadable(path: str | Path, e: OSError, error: type[SafetypatchError] = DataError) -> SafetypatchError:
    if isinstance(e, IsADirectoryError):
        return error(f"{path}: is a directory, not a file")
    if isinstance(e, FileNotFoundError):
        return error(f"{path}: no such file")
    return error(f"{path}: cannot read the file ({e.strerror or e})")


@contextmanager
def open_text(path: str | Path, error: type[SafetypatchError] = DataError, newline: str | None = None
              ) -> Iterator[IO[str]]:
    """`open(path)` for reading UTF-8 text with or without a BOM, line by line; a decode error raised while the
    caller reads becomes `error` naming the file and line, an OSError one naming the file."""
    try:
        f = open(path, encoding=ENCODING, newline=newline)
    except OSError as e:
        raise unreadable(path, e, error) from None
    with f:
        try:
            yield f
        except UnicodeDecodeError:
            raise not_utf8(path, error) from None
        except OSError as e:  # e.g. EISDIR on the first read of a directory opened by name
            raise unreadable(path, e, error) from None


def read_text(path: str | Path, error: type[SafetypatchError] = DataError) -> str:
    """The whole file as text (UTF-8 with or without a BOM, universal newlines), or `error` naming file and line."""
    with open_text(path, error) as f:
        return f.read()


def bad_unicode(obj: Any) -> str | None:
    """The first string in a parsed JSON value (keys included) that holds an unpaired surrogate, or None. JSON can
    spell one (`"\\ud800"`) though it is no character: a tokenizer or a UTF-8 writer fails on it later."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def check_json_unicode(text: str, obj: Any, where: str, error: type[SafetypatchError] = DataError) -> None:
    """Refuse a value parsed from JSON (or YAML) whose source `text` spells an unpaired surrogate as an escape
    (checked only when the text holds such an escape)."""
    if _SURROGATE_ESCAPE.search(text) and (s := bad_unicode(obj)) is not None:
        m = re.search(r"[\ud800-\udfff]", s)
        code = f"\\u{ord(m.group(0)):04x}" if m else "\\ud8xx"
        raise error(f"{where}: holds the escape {code}, an unpaired surrogate that is no Unicode character; "
                    "remove it or write the intended character")


def read_yaml_mapping(path: Path, error: type[SafetypatchError], top_level: tuple[str, ...], expected: str
                      ) -> dict[str, Any]:
    """A YAML file's top-level mapping (UTF-8 with or without a BOM) whose keys are all in `top_level`; `error`
    naming the file otherwise (`expected`: what the top level should hold, for the message)."""
    import yaml

    source = str(path)
    text = read_text(path, error)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{source}: not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # a value YAML accepts but Python cannot build (date 2020-13-45)
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise error(f"{source}: not usable YAML ({why})") from None
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping with {expected} at the top level")
    check_json_unicode(text, data, source, error)  # a "\ud800" escape: no character, unwritable as UTF-8
    unknown = sorted(map(str, set(data) - set(top_level)))
    if unknown:
        raise error(f"{source}: unknown top-level field(s) {unknown}; known: {', '.join(top_level)}")
    return data
