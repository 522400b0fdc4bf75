"""Chat formatting with the tokenizer's chat template, and response-only labels.

A tokenizer without a chat template formats with the `plain` fallback (`data/templates.py`: BOS, `User:` /
`Assistant:` turns, answers closed by EOS), with one warning line per model and process; `modeling.load_tokenizer`
sets the template `--chat-template` chose, so that is the case only for tokenizers built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .templates import choose_template, end_of_turn_id

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    kind: str = "refusal"  # refusal | recovery | anchor | mix: which loss term the example feeds (recovery: refusal's)

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


def _fallback(tok: Any) -> dict[str, Any]:
    """apply_chat_template's keywords: none for a tokenizer with a template; the plain template (one warning line
    per model and process) for one without."""
    if getattr(tok, "chat_template", None):
        return {}
    return {"chat_template": choose_template(tok).text}


def _template_ids(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                  **_fallback(tok))
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def _template_text(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                   **_fallback(tok))


def prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation followed by the assistant-turn header (what generation starts from).

    A chat whose last message has role "assistant" is prefilled: the assistant's answer starts with that text, and
    generation continues it (the prefilling attack of Qi et al., ICLR 2025). Its ids are the earlier turns' prompt
    ids followed by the text's own tokens."""
    if messages and messages[-1].get("role") == "assistant":
        # The prefill goes exactly where the model's generated tokens would go: after the assistant-turn header,
        # tokenized alone. Not the template's continue_final_message: it re-renders the whole conversation, and
        # templates that insert text into an assistant turn (an empty think block, a date line) would put that
        # text between the header and the prefill, which generation never produces.
        head = _template_ids(tok, messages[:-1], add_generation_prompt=True)
        return head + list(tok(messages[-1]["content"], add_special_tokens=False)["input_ids"])
    return _template_ids(tok, messages, add_generation_prompt=True)


def prefilled(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """The chat `messages` with the assistant's answer starting with `text` (see `prompt_ids`)."""
    return [*messages, {"role": "assistant", "content": text}]


def prompt_text(tok: Any, messages: list[dict[str, str]]) -> str:
    """The text of `prompt_ids` (a prefilled chat: the earlier turns' prompt text followed by the prefill)."""
    if messages and messages[-1].get("role") == "assistant":
        return _template_text(tok, messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
    return _template_text(tok, messages, add_generation_prompt=True)


def _response_ids(tok: Any, messages: list[dict[str, str]], response: str, p_ids: list[int]) -> list[int]:
    """The tokens of `response` and the template's end of turn after the prompt `p_ids`: the full conversation's
    tokens past the prompt when the prompt's tokens are their prefix; otherwise the text the template adds after
    the prompt, tokenized alone (what generation would have to produce after `p_ids`)."""
    full_msgs = messages + [{"role": "assistant", "content": response}]
    full = _template_ids(tok, full_msgs, add_generation_prompt=False)
    if full[: len(p_ids)] == p_ids:
        return full[len(p_ids):]
    text, head = _template_text(tok, full_msgs, False), prompt_text(tok, messages)
    if text.startswith(head):
        return tok(text[len(head):], add_special_tokens=False)["input_ids"]
    stop = end_of_turn_id(tok)
    return tok(response, add_special_tokens=False)["input_ids"] + ([stop] if stop is not None else [])


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
    if isinstance(response, list) or not close_turn:
        r_ids = list(response) if isinstance(response, list) else tok(response, add_special_tokens=False)["input_ids"]
        stop = end_of_turn_id(tok)
        if close_turn and stop is not None:
            r_ids.append(stop)
    else:
        r_ids = _response_ids(tok, messages, response, p_ids)
    # keep the whole response if possible: truncate the prompt from the left, then the response from the right
    budget = max_length - len(r_ids)
    if budget < 8:
        r_ids = r_ids[: max(1, max_length - min(len(p_ids), max_length // 2))]
        budget = max_length - len(r_ids)
    if len(p_ids) > budget:
        p_ids = p_ids[-budget:]
    ids = p_ids + r_ids
    return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(p_ids) + r_ids, kind=kind)
