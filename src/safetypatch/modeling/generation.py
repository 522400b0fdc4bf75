"""Batched generation: `generate` encodes chat prompts, sorts them by length so each batch carries little padding,
and returns one `Generation` per prompt in the caller's order.

Greedy decoding runs by hand (`greedy.py`: the shared chat prefix's KV cache computed once, finished rows leaving
the batch) wherever that equals model.generate's computation: no logits processor from the model's
generation_config that the hand loop lacks, a decoder-only model. Sampling, and models where it does not hold, go
through left-padded `model.generate`. The benchmark and tests switch the hand loop off (`_FAST_GREEDY`) to compare.

A prompt never exceeds the model's context (`fit_context`): one longer than the context less `max_new_tokens` is
cut, keeping the chat template's opening and the end of the prompt, with one warning line; `max_new_tokens` that
leave no room for a prompt is a ConfigError.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import GenerationConfig
from ..data.chat import common_prefix_length, prompt_ids
from ..errors import ConfigError
from .compat import unwrap_lm
from .greedy import greedy_batch, greedy_check, left_pad, prefix_kv_cache, shared_prefix

Chat = list[dict[str, str]]
log = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # new tokens only, without padding or the end-of-turn token
    finished: bool  # ended with the end-of-turn token (not cut at max_new_tokens)


def as_chat(prompt: Any) -> Chat:
    """A plain string as one user turn; a record (anything with `.chat()`) as its chat; a chat as it is."""
    if hasattr(prompt, "chat"):
        return prompt.chat()
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def stop_ids(model: Any, tok: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos and the model's generation_config eos id(s), sorted."""
    ids = {tok.eos_token_id}
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gc_eos, int):
        ids.add(gc_eos)
    elif isinstance(gc_eos, (list, tuple)):
        ids.update(gc_eos)
    return sorted(i for i in ids if i is not None)


_FAST_GREEDY = True  # greedy decoding by hand (the default); the benchmark and tests switch it off to compare
# logits processors that model.generate would add from the model's generation_config; the hand loop has none
_PROCESSOR_FIELDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                     "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
                     "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                     "sequence_bias": None, "renormalize_logits": False, "exponential_decay_length_penalty": None,
                     "guidance_scale": None, "watermarking_config": None, "epsilon_cutoff": 0.0,
                     "eta_cutoff": 0.0, "diversity_penalty": 0.0, "num_beams": 1}


def fast_greedy_ok(model: Any, cfg: GenerationConfig) -> bool:
    """Whether the hand greedy decoder computes what model.generate would for this model and config."""
    if not _FAST_GREEDY or cfg.do_sample:
        return False
    gc = getattr(model, "generation_config", None)
    for name, default in _PROCESSOR_FIELDS.items():
        val = getattr(gc, name, default) if gc is not None else default
        if val not in (default, None) and not (name == "min_length" and val == 0):
            return False
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return not getattr(model.config, "is_encoder_decoder", False) and mt is not None


_WARNED: Any = None  # weakref.WeakSet of the models whose fallback to model.generate was announced


def _hand_loop_verified(model: Any, encoded: list[list[int]], pad: int, device: Any) -> bool:
    """Whether the hand greedy loop may decode for `model` (greedy.greedy_check, once per model); if not,
    one warning line says why and model.generate decodes instead."""
    import weakref

    global _WARNED
    _WARNED = _WARNED if _WARNED is not None else weakref.WeakSet()
    why = greedy_check(model, encoded, pad, device)
    if why is not None and model not in _WARNED:
        _WARNED.add(model)
        log.warning("warning: the hand greedy decoder is off for %s (model.generate decodes instead): %s",
                    type(unwrap_lm(model)).__name__, why)
    return why is None


def _hf_batch(model: Any, rows: list[list[int]], cfg: GenerationConfig, stop: list[int], pad: int, device: Any
              ) -> list[list[int]]:
    """New tokens of each row from one left-padded `model.generate` call (sampling, or the hand loop switched off)."""
    import torch

    input_ids, attn = left_pad(rows, pad)
    kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                  pad_token_id=pad, eos_token_id=stop)
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:  # silence warnings about sampling knobs inherited from the model's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
    return out[:, input_ids.shape[1]:].tolist()


def _collect(tok: Any, idx: list[int], new: list[list[int]], stop: list[int], results: list[Any]) -> None:
    """Cut each row's new tokens at the first stop token and store its Generation at the caller's index."""
    for row, i in enumerate(idx):
        toks = new[row]
        finished = False
        for j, t in enumerate(toks):
            if t in stop:
                toks, finished = toks[:j], True
                break
        text = tok.decode(toks, skip_special_tokens=True)
        results[i] = Generation(text=text.strip(), token_ids=toks, finished=finished)


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: Any) -> int | None:
    """The model's context in tokens, from its config (None when the config does not say)."""
    cfg = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def fit_context(model: Any, tok: Any, encoded: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Prompts cut to fit the model's context with room for `max_new_tokens`: a longer prompt keeps the chat
    template's opening (system prompt, user-turn header) and its last tokens (the end of the text and the
    assistant-turn header); the text in between is dropped, with one warning line for the call. Prompts that fit
    are returned as they are (the same list objects)."""
    context = context_length(model)
    if context is None:
        return encoded
    budget = context - max_new_tokens
    if budget < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                          f"{context} tokens; lower --max-new-tokens below {context}")
    long = [i for i, ids in enumerate(encoded) if len(ids) > budget]
    if not long:
        return encoded
    probe = prompt_ids(tok, [{"role": "user", "content": "x"}])  # where a user's text starts in the template
    out = list(encoded)
    for i in long:
        ids = encoded[i]
        head = min(common_prefix_length([ids, probe]), budget // 2)
        out[i] = ids[:head] + ids[len(ids) - (budget - head):]
    longest = max(len(encoded[i]) for i in long)
    log.warning("warning: %d prompt(s) longer than the model's context were cut to %d tokens (context %d less "
                "max_new_tokens %d; the longest had %d): the chat template's opening and the end of the text are "
                "kept, the text in between is dropped", len(long), budget, context, max_new_tokens, longest)
    return out


def _autocast(device: Any, bf16: bool) -> Any:
    """bf16 autocast when asked, else nothing: an autocast(enabled=False) here would switch off a caller's autocast
    (the trainer's dev checks run under it with bf16 frozen weights)."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[str | Chat],
    cfg: GenerationConfig | None = None,
    desc: str = "generating",
    progress: bool = True,
    decided: Callable[[str], bool] | None = None,
) -> list[Generation]:
    """Generate an answer for each prompt (greedy unless cfg.do_sample), batched and length-sorted.

    `decided(partial text)`: with greedy decoding by hand, a row stops as soon as it returns True (a judge whose
    verdict can no longer change, e.g. `judges.keyword_refusal_decided`); its text is then only the opening, and
    `finished` is False. Elsewhere it is ignored and every answer runs to the end."""
    import torch
    from tqdm.auto import tqdm

    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    encoded = fit_context(model, tok, [prompt_ids(tok, as_chat(p)) for p in prompts], cfg.max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stop = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    batches = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress or len(encoded) < 2, leave=False)
    fast = fast_greedy_ok(model, cfg)
    row_decided = (lambda toks: decided(tok.decode(toks, skip_special_tokens=True))) if decided else None  # noqa: E731
    try:
        with _autocast(device, cfg.bf16):
            fast = fast and _hand_loop_verified(model, encoded, pad, device)
            prefix = shared_prefix(encoded) if fast else []
            prefix_cache = prefix_kv_cache(model, prefix, device) if prefix else None
            for idx in batches:
                if fast:
                    new = greedy_batch(model, [encoded[i][len(prefix):] for i in idx], prefix, prefix_cache,
                                       cfg.max_new_tokens, stop, pad, device, row_decided)
                else:
                    new = _hf_batch(model, [encoded[i] for i in idx], cfg, stop, pad, device)
                _collect(tok, idx, new, stop, results)
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]
