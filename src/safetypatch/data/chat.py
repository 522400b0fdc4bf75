"""Chat formatting with the tokenizer's own chat template, and response-only labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    kind: str = "refusal"  # refusal | anchor | mix: which loss term the example feeds

    @property
    def n_response(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix all `seqs` share, leaving at least one token of each outside it (the
    chat template's system prompt and turn header, which generation and training compute once)."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def _template_ids(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation followed by the assistant-turn header (what generation starts from)."""
    if getattr(tok, "chat_template", None):
        return _template_ids(tok, messages, add_generation_prompt=True)
    text = "\n".join(m["content"] for m in messages) + "\n"
    return tok(text, add_special_tokens=True)["input_ids"]


def prompt_text(tok: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages) + "\n"


def encode_example(
    tok: Any,
    messages: list[dict[str, str]],
    response: str | list[int],
    max_length: int,
    kind: str = "refusal",
    close_turn: bool = True,
) -> Encoded:
    """Tokenize prompt + response; labels cover the response tokens only.

    `response` may be text, or token ids (a base model's own answer, kept exactly as generated). With
    `close_turn`, the end-of-turn tokens of the template follow the response and are learned too, so the model
    learns to stop; a truncated answer (an anchor) passes close_turn=False.
    """
    p_ids = prompt_ids(tok, messages)
    if isinstance(response, list):
        r_ids = list(response)
        if close_turn and tok.eos_token_id is not None:
            r_ids.append(tok.eos_token_id)
    elif getattr(tok, "chat_template", None) and close_turn:
        full = _template_ids(tok, messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        if full[: len(p_ids)] == p_ids:
            r_ids = full[len(p_ids):]
        else:  # template renders the prompt differently once an answer follows: tokenize the answer alone
            r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    else:
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        if close_turn and tok.eos_token_id is not None:
            r_ids.append(tok.eos_token_id)
    # keep the whole response if possible: truncate the prompt from the left, then the response from the right
    budget = max_length - len(r_ids)
    if budget < 8:
        r_ids = r_ids[: max(1, max_length - min(len(p_ids), max_length // 2))]
        budget = max_length - len(r_ids)
    if len(p_ids) > budget:
        p_ids = p_ids[-budget:]
    ids = p_ids + r_ids
    return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(p_ids) + r_ids, kind=kind)
