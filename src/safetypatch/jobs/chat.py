"""`safetypatch chat [--patch P]`: type a request, see the base model's and the patched model's answers side by side.

One model is loaded; with a patch attached, the base answer is generated with the patch switched off
(`modeling.variant(model, "base")`).
Prompts come from the terminal (an empty line or /quit ends) or, without a TTY, one per line from stdin.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO

from ..config import GenerationConfig, MODEL_HELP, check_numbers
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice


@dataclass
class ChatConfig:
    model: str = field(default="default", metadata={"help": MODEL_HELP})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)
    patch: str | None = field(default=None, metadata={"help": "patch directory"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated per answer", "min": 1})

    def validate(self, where: str = "config") -> None:
        check_numbers(self, where)
        check_choice(self.chat_template, where=where)


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
    from ..modeling import generate, variant

    with variant(model, "base" if base else "patched") as m:
        return generate(m, tok, [prompt], gen, progress=False)[0].text


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


def read_prompts(stream: TextIO) -> Iterable[str]:
    """Lines typed at a `you> ` prompt on a terminal, else the stream's lines."""
    if stream.isatty():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return
    else:
        yield from stream


def run_chat(cfg: ChatConfig) -> int:
    """Load the model (and the patch), then answer prompts from stdin until an empty line or /quit."""
    from ..modeling import load_model
    from ..evals.backend import warn_template_mismatch
    from ..patches import load_patch, verify_files

    cfg.validate("chat")
    if cfg.patch:
        verify_files(cfg.patch)  # a missing or damaged patch fails before the model is loaded
    model, tok = load_model(cfg.model, chat_template=cfg.chat_template)
    if cfg.patch:
        model = load_patch(model, cfg.patch)
        warn_template_mismatch(cfg.patch, tok)
    width = max(30, (shutil.get_terminal_size((140, 20)).columns - 3) // 2)
    if sys.stdin.isatty():
        print(f"chatting with {cfg.model}" + (f" (left: base, right: patched with {cfg.patch})" if cfg.patch else "")
              + "; an empty line or /quit ends")
    chat(model, tok, read_prompts(sys.stdin), sys.stdout, GenerationConfig(max_new_tokens=cfg.max_new_tokens),
         patched=bool(cfg.patch), width=width)
    return 0
