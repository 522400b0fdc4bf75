"""Batched generation backends. The transformers backend pads on the left and sorts prompts by length so each
batch carries little padding; outputs come back in the caller's order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .config import GenerationConfig
from .data.chat import prompt_ids

Chat = list[dict[str, str]]


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # new tokens only, without padding or the end-of-turn token
    finished: bool  # ended with the end-of-turn token (not cut at max_new_tokens)


def as_chat(prompt: str | Chat) -> Chat:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _stop_ids(model: Any, tok: Any) -> list[int]:
    ids = {tok.eos_token_id}
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gc_eos, int):
        ids.add(gc_eos)
    elif isinstance(gc_eos, (list, tuple)):
        ids.update(gc_eos)
    return sorted(i for i in ids if i is not None)


def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[str | Chat],
    cfg: GenerationConfig | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> list[Generation]:
    """Generate an answer for each prompt (greedy unless cfg.do_sample), batched and length-sorted."""
    import torch
    from tqdm.auto import tqdm

    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    encoded = [prompt_ids(tok, as_chat(p)) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stop = _stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    batches = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress or len(encoded) < 2, leave=False)
    try:
        for idx in batches:
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attn[row, width - len(ids):] = 1
            kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                          pad_token_id=pad, eos_token_id=stop)
            if cfg.do_sample:
                kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            else:  # silence warnings about sampling knobs inherited from the model's generation_config
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                finished = False
                for j, t in enumerate(toks):
                    if t in stop:
                        toks, finished = toks[:j], True
                        break
                text = tok.decode(toks, skip_special_tokens=True)
                results[i] = Generation(text=text.strip(), token_ids=toks, finished=finished)
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]
