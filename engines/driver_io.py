"""What the engine drivers (llamacpp_generate.py, vllm_generate.py) share, on both sides of the call.

Driver side: reading the JSON request (defaults, unknown fields) and the command line
`DRIVER REQUEST.json RESPONSE.json`, whose response is written atomically.
Caller side (the engine tests, benchmarks/generation_throughput.py): which python runs an engine (`engine_python`)
and one driver call (`call_driver`). Standard library only: each driver runs in its engine's own venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
# engine -> (its venv, built by engines/install-<engine>.sh; the variable naming another python; its driver)
ENGINES = {"vllm": (".venv-vllm", "SAFETYPATCH_VLLM_PYTHON", "vllm_generate.py"),
           "llamacpp": (".venv-llamacpp", "SAFETYPATCH_LLAMACPP_PYTHON", "llamacpp_generate.py")}


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


def engine_python(name: str) -> Path | None:
    """The python that runs engine `name`: its variable when set, else the venv's once its install finished
    (.stamp-engine); None when neither."""
    venv, env, _ = ENGINES[name]
    if os.environ.get(env):
        return Path(os.environ[env])
    return ROOT / venv / "bin" / "python" if (ROOT / venv / ".stamp-engine").is_file() else None


def call_driver(python: Path | str, name: str, request: dict[str, Any], work_dir: Path, tag: str = "request",
                timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """Run engine `name`'s driver with `python` on `request` (files TAG.request.json / TAG.response.json in
    `work_dir`): the finished process and its response ({} when it failed)."""
    req, resp = work_dir / f"{tag}.request.json", work_dir / f"{tag}.response.json"
    req.write_text(json.dumps(request))
    proc = subprocess.run([str(python), str(ROOT / "engines" / ENGINES[name][2]), str(req), str(resp)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, (json.loads(resp.read_text()) if proc.returncode == 0 else {})
