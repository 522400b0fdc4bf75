"""What the engine drivers (llamacpp_generate.py, vllm_generate.py) share: reading the JSON request (defaults,
unknown fields) and the command line `DRIVER REQUEST.json RESPONSE.json`, whose response is written atomically.
Standard library only: each driver runs in its engine's own venv."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable


class RequestError(ValueError):
    """A request that cannot be run; the message names the field and the fix."""


def read_json_request(path: str | Path, defaults: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """The request at `path` with `defaults` filled in; RequestError when it is not a JSON object or names a field
    that is neither required nor defaulted."""
    try:
        req = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RequestError(f"request {path}: cannot read it as JSON ({e})") from None
    if not isinstance(req, dict):
        raise RequestError(f"request {path}: expected a JSON object")
    known = set(defaults) | set(required)
    unknown = set(req) - known
    if unknown:
        raise RequestError(f"request {path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    return {**defaults, **req}


def driver_main(name: str, read: Callable[[str], dict[str, Any]], run: Callable[[dict[str, Any]], dict[str, Any]],
                failures: tuple[type[BaseException], ...], argv: list[str] | None = None) -> int:
    """`name REQUEST.json RESPONSE.json`: 2 with one line for a bad request, 1 with one line for an engine failure
    of a type in `failures`, else 0 with the response written (temp file renamed into place)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f"usage: {name}.py REQUEST.json RESPONSE.json (fields: see the module docstring)", file=sys.stderr)
        return 2
    try:
        response = run(read(argv[0]))
    except RequestError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"{name}: the engine could not run the request: {e}", file=sys.stderr)
        return 1
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(response))
    tmp.replace(argv[1])
    return 0
