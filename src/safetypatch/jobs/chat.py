"""`safetypatch chat [--patch P]`: type a request, see the base model's and the patched model's answers side by side.

One model is loaded; with a patch attached, the base answer is generated under PEFT's `disable_adapter()`.
Prompts come from the terminal (an empty line or /quit ends) or, without a TTY, one per line from stdin.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from typing import Any, Iterable, TextIO

from ..config import GenerationConfig


def side_by_side(left: str, right: str, width: int, titles: tuple[str, str] = ("base", "patched")) -> str:
    """Two texts in two columns of `width` characters each."""
    cols = [textwrap.wrap(t, width) or [""] for t in (left, right)]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(map(len, cols))):
        a = cols[0][i] if i < len(cols[0]) else ""
        b = cols[1][i] if i < len(cols[1]) else ""
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def answer(model: Any, tok: Any, prompt: str, gen: GenerationConfig, base: bool = False) -> str:
    from contextlib import nullcontext

    from ..modeling.generation import generate

    ctx = model.disable_adapter() if base and hasattr(model, "disable_adapter") else nullcontext()
    with ctx:
        return generate(model, tok, [prompt], gen, progress=False)[0].text


def chat(model: Any, tok: Any, lines: Iterable[str], out: TextIO, gen: GenerationConfig,
         patched: bool, width: int = 60) -> int:
    """Answer each prompt in `lines` until an empty line or /quit; returns how many were answered."""
    n = 0
    for line in lines:
        prompt = line.strip()
        if not prompt or prompt in ("/quit", "/exit"):
            break
        if patched:
            out.write(side_by_side(answer(model, tok, prompt, gen, base=True),
                                   answer(model, tok, prompt, gen), width) + "\n\n")
        else:
            out.write(answer(model, tok, prompt, gen) + "\n\n")
        out.flush()
        n += 1
    return n


def _prompts(stream: TextIO) -> Iterable[str]:
    if stream.isatty():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return
    else:
        yield from stream


def run_chat(model_spec: str, patch: str | None, max_new_tokens: int) -> int:
    from ..modeling.loading import load_model
    from ..patches.artifact import load_patch, verify_files

    if patch:
        verify_files(patch)  # a missing or damaged patch fails before the model is loaded
    model, tok = load_model(model_spec)
    if patch:
        model = load_patch(model, patch)
    width = max(30, (shutil.get_terminal_size((140, 20)).columns - 3) // 2)
    if sys.stdin.isatty():
        print(f"chatting with {model_spec}" + (f" (left: base, right: patched with {patch})" if patch else "")
              + "; an empty line or /quit ends")
    chat(model, tok, _prompts(sys.stdin), sys.stdout, GenerationConfig(max_new_tokens=max_new_tokens),
         patched=bool(patch), width=width)
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("chat", help="ask questions; with --patch, see base and patched answers side by side")
    c.add_argument("--model", default="default", help="hub id, local dir, .gguf file, or 'default'")
    c.add_argument("--patch", help="patch directory")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.set_defaults(func=lambda a: run_chat(a.model, a.patch, a.max_new_tokens))
