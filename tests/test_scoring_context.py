"""Scoring never sends more than the model's context: long inputs keep their last tokens (lm-eval's truncation)."""

import pytest

from safetypatch.errors import DataError
from safetypatch.modeling.scoring import continuation_requests, fit_input, rolling_loglikelihoods, score_continuations


def test_fit_input_keeps_the_last_tokens():
    assert fit_input(list(range(10)), 3, 4) == [6, 7, 8, 9]
    assert fit_input(list(range(10)), 3, None) == list(range(10))
    with pytest.raises(DataError, match="do not fit the model's context of 4 tokens"):
        fit_input(list(range(10)), 5, 4)


def test_empty_choice_is_a_data_error(tiny_tok):
    with pytest.raises(DataError, match="every choice needs text"):
        continuation_requests(tiny_tok, [("Question: 2 + 2?", "")])


def test_long_inputs_are_cut_to_the_context(tiny_model, tiny_tok, monkeypatch):
    context = tiny_model.config.max_position_embeddings
    seen: list[int] = []
    forward = type(tiny_model).forward

    def checked(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "forward", checked)
    long_text = "The capital of France is Paris. " * 400  # far beyond 512 tokens
    (ll, n), = score_continuations(tiny_model, tiny_tok, [(long_text, " Paris")], progress=False)
    assert n >= 1 and ll < 0
    (ll2, n2), = rolling_loglikelihoods(tiny_model, tiny_tok, [long_text], max_length=10_000, progress=False)
    assert n2 == context - 1
    assert max(seen) <= context
