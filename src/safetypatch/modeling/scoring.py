"""Token-level scoring shared by training and evaluation: log-likelihoods of given tokens, and KL(base || patched).

KL(base || patched) per position, from the two models' log-probabilities over the vocabulary:
    KL_t = sum_v p_base(v) (log p_base(v) - log p_patched(v))
with xlogy semantics: a token with p_base = 0 contributes 0 (never NaN). Used by the trainer's KL anchor loss, the
suites' `kl` entries and the red-teaming rounds' drift measure, so all three compute the same quantity.

The batched scorers below (continuations, rolling log-likelihood of whole texts, KL on given answers) are written
here because transformers has no batched continuation scorer; lm-evaluation-harness has one but is not a
dependency. Each left-pads its rows, groups them longest first under a token budget, and keeps only the logits
of the positions it scores. They serve the transformers backend (`modeling.backends`). An input longer than the
model's context keeps its last `context` tokens (the scored tokens and what directly precedes them), as
lm-evaluation-harness truncates its requests.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..data.chat import prompt_ids
from ..errors import DataError
from .generation import context_length
from .variants import variant

MAX_BATCH_TOKENS = 4096  # rows x padded width per forward pass (bounds activations)
MAX_LOGIT_TOKENS = 1024  # rows x scored positions per forward pass: bounds the (rows, keep, vocab) float32 logits


def token_kl(logp_base: Any, logp_patched: Any) -> Any:
    """KL(base || patched) at each position: log-probabilities [..., vocab] in, [...] out (differentiable in
    `logp_patched`)."""
    import torch

    p_base = logp_base.exp()
    return torch.where(p_base > 0, p_base * (logp_base - logp_patched), torch.zeros_like(p_base)).sum(-1)


def forward_logits(model: Any, seqs: list[list[int]], keep: int) -> Any:
    """Log-probabilities (float32) at the last `keep` positions of each left-padded sequence: (rows, keep, vocab).

    Position ids follow the attention mask, so a left-padded row gets the same logits as the row alone.
    """
    import torch

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        attn[r, width - len(s):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device))
    with torch.no_grad():
        try:
            logits = model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # architectures without `logits_to_keep`
            logits = model(**kwargs).logits
    return torch.log_softmax(logits[:, -keep:].float(), dim=-1)


def batches(order: list[int], lengths: list[int], keeps: list[int], max_rows: int, max_tokens: int,
            max_logit_tokens: int = MAX_LOGIT_TOKENS) -> list[list[int]]:
    """Group indices (sorted longest first) so rows x width <= max_tokens and rows x keep <= max_logit_tokens
    (a single row always fits)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        rows = len(cur) + 1
        width = max([lengths[j] for j in cur] + [lengths[i]])
        keep = max([keeps[j] for j in cur] + [keeps[i]])
        if cur and (rows > max_rows or rows * width > max_tokens or rows * keep > max_logit_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def target_logprobs(lp: Any, row: int, keep: int, targets: Sequence[int]) -> Any:
    """log p(targets[t]) at the last len(targets) of the `keep` scored positions of `row`: a 1-D tensor."""
    import torch

    n = len(targets)
    idx = torch.tensor(list(targets), dtype=torch.long, device=lp.device).unsqueeze(-1)
    return lp[row, keep - n:].gather(-1, idx).squeeze(-1)


def fit_input(ids: Sequence[int], scored: int, context: int | None) -> list[int]:
    """The model input `ids` cut from the left to the model's `context` (None: no limit); the last `scored` tokens
    must fit, else DataError."""
    if context is None or len(ids) <= context:
        return list(ids)
    if scored > context:
        raise DataError(f"{scored} tokens to score do not fit the model's context of {context} tokens; "
                        "shorten that text or answer")
    return list(ids[len(ids) - context:])


def _progress(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress or total < 2, leave=False)


def continuation_requests(tok: Any, pairs: Sequence[tuple[str, str]],
                          context: int | None = None) -> list[tuple[tuple[int, ...], list[int]]]:
    """(model input, continuation ids) of each (context, continuation) pair.

    Tokenized as lm-evaluation-harness does: the whole text is encoded and split at the context's length. The
    model reads context + continuation minus its last token (its last `context` tokens when longer).
    """
    reqs: list[tuple[tuple[int, ...], list[int]]] = []
    for ctx, cont in pairs:
        ctx_ids = list(tok(ctx)["input_ids"])
        whole = list(tok(ctx + cont)["input_ids"])
        if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
            cont_ids = whole[len(ctx_ids):]
        else:
            cont_ids = list(tok(cont, add_special_tokens=False)["input_ids"])
            whole = ctx_ids + cont_ids
        if not cont_ids:
            raise DataError(f"empty continuation {cont!r}: every choice needs text")
        if not ctx_ids:
            raise DataError(f"empty context for continuation {cont!r}: every question needs text")
        reqs.append((tuple(fit_input(whole[:-1], len(cont_ids), context)), cont_ids))
    return reqs


def score_continuations(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                        max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
                        desc: str = "scoring") -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of tokens) of each continuation given its context.

    Requests with the same input (e.g. the letters " A".." D" after one MMLU question) share one forward pass.
    """
    reqs = continuation_requests(tok, pairs, context_length(model))
    need: dict[tuple[int, ...], int] = {}  # input -> most positions any of its continuations needs
    by_input: dict[tuple[int, ...], list[int]] = {}
    for k, (inp, cont) in enumerate(reqs):
        need[inp] = max(need.get(inp, 0), len(cont))
        by_input.setdefault(inp, []).append(k)
    inputs = list(need)
    lengths = [len(x) for x in inputs]
    keeps = [need[x] for x in inputs]
    order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
    results: list[tuple[float, int] | None] = [None] * len(reqs)
    bar = _progress(len(inputs), desc, progress)
    try:
        for batch in batches(order, lengths, keeps, batch_size, max_batch_tokens):
            keep = max(keeps[i] for i in batch)
            lp = forward_logits(model, [list(inputs[i]) for i in batch], keep)
            for row, i in enumerate(batch):
                for k in by_input[inputs[i]]:
                    cont = reqs[k][1]
                    results[k] = (float(target_logprobs(lp, row, keep, cont).sum()), len(cont))
            bar.update(len(batch))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def rolling_loglikelihoods(model: Any, tok: Any, texts: Sequence[str], max_length: int = 512, batch_size: int = 8,
                           max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
                           desc: str = "perplexity") -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of predicted tokens) of each whole text, truncated to `max_length`
    tokens; every token after the first is predicted. A text of fewer than two tokens gives (0.0, 0)."""
    limit = min(max_length, context_length(model) or max_length)
    seqs = [list(tok(t)["input_ids"])[:limit] for t in texts]
    lengths = [max(0, len(s) - 1) for s in seqs]
    order = sorted((i for i, s in enumerate(seqs) if len(s) >= 2), key=lambda i: -lengths[i])
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    bar = _progress(len(order), desc, progress)
    try:
        for batch in batches(order, lengths, lengths, batch_size, max_batch_tokens):
            inputs = [seqs[i][:-1] for i in batch]
            keep = max(len(x) for x in inputs)
            lp = forward_logits(model, inputs, keep)
            for row, i in enumerate(batch):
                targets = seqs[i][1:]
                out[i] = (float(target_logprobs(lp, row, keep, targets).sum()), len(targets))
            bar.update(len(batch))
    finally:
        bar.close()
    return out


def answer_kl_tokens(model: Any, tok: Any, chats: Sequence[list[dict[str, str]]], answers: Sequence[list[int]],
                     batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
                     desc: str = "KL to base") -> dict[int, list[float]]:
    """{chat index: KL(base || patched) at each token of its answer} for each chat whose given answer is not empty,
    teacher-forced after the chat's prompt, in the order scored (longest first). Base is `variant(model, "base")`."""
    items = []  # (chat index, input ids, answer ids)
    context = context_length(model)
    for i, (chat, ans) in enumerate(zip(chats, answers)):
        if ans:
            full = prompt_ids(tok, chat) + list(ans)
            items.append((i, fit_input(full[:-1], len(ans), context), list(ans)))
    lengths = [len(x[1]) for x in items]
    keeps = [len(x[2]) for x in items]
    order = sorted(range(len(items)), key=lambda k: -lengths[k])
    out: dict[int, list[float]] = {}
    bar = _progress(len(items), desc, progress)
    try:
        for batch in batches(order, lengths, keeps, batch_size, max_batch_tokens):
            keep = max(keeps[k] for k in batch)
            seqs = [items[k][1] for k in batch]
            with variant(model, "base"):
                lp_base = forward_logits(model, seqs, keep)
            lp_patch = forward_logits(model, seqs, keep)
            kl = token_kl(lp_base, lp_patch)
            del lp_base, lp_patch
            for row, k in enumerate(batch):
                out[items[k][0]] = kl[row, keep - len(items[k][2]):].tolist()
            bar.update(len(batch))
    finally:
        bar.close()
    return out


def answer_kl(model: Any, tok: Any, chats: Sequence[list[dict[str, str]]], answers: Sequence[list[int]],
              batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
              desc: str = "KL to base") -> dict[int, tuple[float, int]]:
    """{chat index: (sum over its answer's tokens of KL(base || patched), number of tokens)}: `answer_kl_tokens`
    summed per answer."""
    per_token = answer_kl_tokens(model, tok, chats, answers, batch_size, max_batch_tokens, progress, desc)
    return {i: (sum(v), len(v)) for i, v in per_token.items()}
