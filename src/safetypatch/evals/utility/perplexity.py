"""Perplexity on a text set, from a backend's `loglikelihood_rolling`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ...errors import DataError
from ...modeling.backends import Backend
from ...modeling.scoring import MAX_BATCH_TOKENS


@dataclass
class PPLResult:
    perplexity: float
    nll_per_token: float
    n_tokens: int
    n_texts: int
    per_text: list[float] = field(default_factory=list)  # mean NLL per token of each text


def perplexity(backend: Backend, texts: Sequence[str], variant: str = "patched", max_length: int = 512,
               batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True) -> PPLResult:
    """exp(mean negative log-likelihood per predicted token), pooled over all texts (truncated to max_length);
    texts of fewer than two tokens predict nothing and are left out."""
    scored = backend.loglikelihood_rolling(texts, variant, max_length=max_length, batch_size=batch_size,
                                           max_batch_tokens=max_batch_tokens, progress=progress)
    nll = [-ll if n else 0.0 for ll, n in scored]
    n_tok = [n for _, n in scored]
    keep_idx = [i for i, n in enumerate(n_tok) if n]
    total_tok = sum(n_tok)
    if total_tok == 0:
        raise DataError("perplexity: no text has two or more tokens")
    mean = sum(nll) / total_tok
    return PPLResult(math.exp(mean), mean, total_tok, len(keep_idx), [nll[i] / n_tok[i] for i in keep_idx])
