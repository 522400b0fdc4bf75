"""Chat templates for `--chat-template auto|plain|chatml|FILE`: how a conversation becomes the text a model reads.

- `auto` (the default): the tokenizer's own template when it has one; otherwise `plain`, with one warning line per
  model and process.
- `plain`: for base models (no chat template, e.g. Gemma-3-270M). The text is

      {bos_token}{system}\\n\\nUser: {user}\\n\\nAssistant: {answer}{eos_token}\\n\\nUser: ...\\n\\nAssistant:

  The BOS token opens the text when the tokenizer has one (SentencePiece models such as Gemma and Llama expect it).
  An assistant turn ends with the EOS token, so a trained answer (a refusal) is learned followed by EOS and
  generation stops there. The generation prompt is `Assistant:` without a trailing space: the space belongs to the
  answer (` I`, `▁I`), so the prompt's tokens are a prefix of prompt + answer tokens with byte-level BPE (GPT-2,
  Llama 3, Qwen) and SentencePiece tokenizers alike; `Assistant: ` would leave a lone space token that the
  tokenizer never produces inside text. The final assistant turn has no `\\n\\n` after its EOS, so the labels of a
  training example are exactly the answer and EOS.
- `chatml`: standard ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, generation prompt
  `<|im_start|>assistant\\n`. A turn ends with `<|im_end|>`: when that is one token of the vocabulary
  (`end_of_turn_id`), answers are learned followed by it and generation stops on it; otherwise the model learns
  the marker as several tokens and generation stops only at EOS or the token limit (one warning says so).
- FILE: a UTF-8 text file holding a Jinja template (the variables of transformers' `apply_chat_template`:
  `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, ...). End an assistant turn with
  `{{ eos_token }}` so generation stops.

`choose_template` resolves a choice for one tokenizer; `check_choice` checks a FILE before any model loads;
`template_record` is what patch.json records (name and sha256 of the text); `template_mismatch` compares a patch's
record with the template in use.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SafetypatchError
from .text import read_text

log = logging.getLogger(__name__)

FLAG = "--chat-template"
AUTO = "auto"
PLAIN = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + message['content'] + (eos_token if eos_token else '') }}"
    "{%- if not loop.last %}{{ '\n\n' }}{% endif -%}"
    "{%- else -%}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'Assistant:' }}{% endif -%}"
)
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}"
)
NAMED = {"plain": PLAIN, "chatml": CHATML}
STOP_TEXT = {"chatml": "<|im_end|>"}  # a named template's end-of-turn marker other than the EOS token
CHOICES = f"{AUTO}, {', '.join(NAMED)} or a Jinja template file"
HELP = ("chat template: 'auto' (the tokenizer's own; 'plain' when it has none), 'plain' (User: / Assistant: text "
        "with BOS and EOS, for base models), 'chatml', or a file holding a Jinja template")
METADATA = {"help": HELP, "metavar": "auto|plain|chatml|FILE"}  # the chat_template field of every job config
_WARNED: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # plain | chatml | tokenizer | file:<file name>
    text: str

    def record(self) -> dict[str, str]:
        return {"name": self.name, "sha256": text_sha256(self.text)}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def warn_once(key: tuple[str, ...], message: str) -> None:
    """`message` as one warning line, the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", message)


def forget_warnings() -> None:
    """Let every once-per-process warning of this module be given again (tests)."""
    _WARNED.clear()


def _jinja_environment() -> Any:
    """A Jinja environment that parses what transformers renders (its `{% generation %}` tag and loop controls)."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])


def read_template_file(value: str, flag: str = FLAG) -> ChatTemplate:
    """The template in the file `value`; ConfigError naming the flag and the file when it is missing, unreadable,
    not UTF-8, empty or not valid Jinja."""
    from jinja2 import TemplateSyntaxError

    fix = f"give {CHOICES} (UTF-8)"
    try:
        text = read_text(value, ConfigError)
    except SafetypatchError as e:  # its message names the file
        raise ConfigError(f"{flag}: {e}; {fix}") from None
    if not text.strip():
        raise ConfigError(f"{flag} {value}: the file is empty; {fix}")
    try:
        _jinja_environment().parse(text)
    except TemplateSyntaxError as e:
        raise ConfigError(f"{flag} {value}:{e.lineno}: not a valid Jinja template ({e.message}); fix the template "
                          f"or {fix}") from None
    return ChatTemplate(f"file:{Path(value).name}", text)


def check_choice(value: Any, flag: str = FLAG, where: str = "") -> None:
    """ConfigError (before any model loads) for a value that is neither a name nor a readable Jinja template file;
    `where` (a recipe file, 'command line') opens the message, as every config field's error does."""
    if where:
        flag = f"{where}: field 'chat_template' ({flag})"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{flag}: expected {CHOICES}, got {value!r}")
    if value not in NAMED and value != AUTO:
        read_template_file(value, flag)


def own_template(tok: Any) -> str | None:
    """The tokenizer's own chat template text (the default of a named set), None when it has none."""
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) and t.strip() else None


def fallback_warning(model: str) -> str:
    return (f"warning: {model} has no chat template; using the plain fallback ({FLAG} plain); pass "
            f"{FLAG} chatml|FILE to choose")


def choose_template(tok: Any, choice: str = AUTO, model: str | None = None, flag: str = FLAG) -> ChatTemplate:
    """The template `choice` means for `tok`: `auto` is the tokenizer's own, else `plain` with one warning line per
    model and process."""
    check_choice(choice, flag)
    if choice == AUTO:
        own = own_template(tok)
        if own is not None:
            return ChatTemplate("tokenizer", own)
        name = model or getattr(tok, "name_or_path", None) or "the model"
        warn_once(("fallback", name), fallback_warning(name))
        return ChatTemplate("plain", PLAIN)
    if choice in NAMED:
        return ChatTemplate(choice, NAMED[choice])
    return read_template_file(choice, flag)


def single_token_id(tok: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer encodes it as exactly one token, else None."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def end_of_turn_id(tok: Any) -> int | None:
    """The token that ends an assistant turn under `tok`'s template: a named template's own marker (ChatML's
    `<|im_end|>`) when it is one token, else the EOS token."""
    text = own_template(tok)
    for name, stop in STOP_TEXT.items():
        if text == NAMED[name]:
            sid = single_token_id(tok, stop)
            if sid is not None:
                return sid
    return tok.eos_token_id


def describe(tok: Any) -> ChatTemplate:
    """The template `tok` formats with, named as `apply_template` chose it (`plain` when it has none)."""
    text = own_template(tok)
    if text is None:
        return ChatTemplate("plain", PLAIN)
    name = getattr(tok, "safetypatch_chat_template", None)
    if not isinstance(name, str):
        name = next((n for n, t in NAMED.items() if t == text), "tokenizer")
    return ChatTemplate(name, text)


def template_record(tok: Any) -> dict[str, str]:
    """What patch.json records as `chat_template`: {"name": ..., "sha256": ...} of the template `tok` uses."""
    return describe(tok).record()


def template_mismatch(recorded: Any, tok: Any, patch: str) -> str | None:
    """The warning line when a patch's recorded template differs from the one `tok` uses, else None (also for a
    patch that records none: trained before templates were recorded)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return None
    now = describe(tok)
    if recorded["sha256"] == text_sha256(now.text):
        return None
    name = str(recorded.get("name", "?"))
    if name.startswith("file:"):
        how = f"{FLAG} with the template file {name[5:]} it was trained with"
    elif name == "tokenizer":
        how = f"{FLAG} auto with the base model the patch was trained on"
    else:
        how = f"{FLAG} {name}"
    return (f"warning: patch {patch} was trained with chat template {name} (sha256 {recorded['sha256'][:12]}) but "
            f"this run uses {now.name} (sha256 {text_sha256(now.text)[:12]}); its refusals may not carry over: pass "
            f"{how}")


def apply_template(tok: Any, choice: str = AUTO, model: str | None = None, flag: str = FLAG) -> ChatTemplate:
    """Set `tok.chat_template` to what `choice` means for it (`choose_template`) and return that template. A
    ChatML template whose `<|im_end|>` is not one token of the vocabulary is used with one warning line."""
    tpl = choose_template(tok, choice, model, flag)
    if tpl.name != "tokenizer":  # the tokenizer's own (a set of named templates, too) is left as it is
        tok.chat_template = tpl.text
    tok.safetypatch_chat_template = tpl.name  # the name `describe` reports (the text alone cannot tell a file's)
    stop = STOP_TEXT.get(tpl.name)
    if stop is not None and single_token_id(tok, stop) is None:
        who = model or getattr(tok, "name_or_path", None) or "the model"
        warn_once(("stop", who, tpl.name), f"warning: {who}: {stop} is not one token of its vocabulary, so a "
                  f"{tpl.name} answer ends with it as several tokens and generation stops only at the EOS token "
                  f"or the token limit; {FLAG} plain ends answers with EOS")
    return tpl
