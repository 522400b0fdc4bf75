"""The backend interface of evaluations: log-likelihoods, rolling log-likelihoods and KL(base || patched) through
TransformersBackend match direct computations; a backend that cannot score says so."""

from __future__ import annotations

import pytest

from safetypatch.config import PatchShape
from safetypatch.errors import BackendError
from safetypatch.modeling.backends import TransformersBackend, VLLMBackend
from safetypatch.patches import attach_new_patch

PAIRS = [("The capital of France is", " Paris."), ("Write a poem about the sea", " and the moon.")]


def _direct_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one unpadded forward pass."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_loglikelihood_matches_direct_computation(tiny_model, tiny_tok):
    got = TransformersBackend(tiny_model, tiny_tok).loglikelihood(PAIRS, progress=False)
    for (ctx, cont), (ll, n) in zip(PAIRS, got):
        whole = tiny_tok(ctx + cont)["input_ids"]
        start = len(tiny_tok(ctx)["input_ids"])
        assert n == len(whole) - start
        assert ll == pytest.approx(_direct_logprob(tiny_model, whole, start), abs=1e-3)


def test_loglikelihood_rolling_matches_direct_computation(tiny_model, tiny_tok):
    texts = ["The capital of France is Paris.", "Hi", "Write a poem about the sea and the moon."]
    got = TransformersBackend(tiny_model, tiny_tok).loglikelihood_rolling(texts, max_length=6, batch_size=2,
                                                                          progress=False)
    for text, (ll, n) in zip(texts, got):
        ids = tiny_tok(text)["input_ids"][:6]
        if len(ids) < 2:
            assert (ll, n) == (0.0, 0)
        else:
            assert n == len(ids) - 1 and ll == pytest.approx(_direct_logprob(tiny_model, ids, 1), abs=1e-3)


def test_variants_and_kl_on_a_patched_model(tiny_model, tiny_tok):
    import torch

    base = [ll for ll, _ in TransformersBackend(tiny_model, tiny_tok).loglikelihood(PAIRS, progress=False)]
    model = attach_new_patch(tiny_model, PatchShape(rank=2, alpha=8.0, target_modules=["up_proj"], layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    backend = TransformersBackend(model, tiny_tok)
    off = [ll for ll, _ in backend.loglikelihood(PAIRS, variant="base", progress=False)]
    on = [ll for ll, _ in backend.loglikelihood(PAIRS, variant="patched", progress=False)]
    assert off == pytest.approx(base, abs=1e-4) and on != pytest.approx(base, abs=1e-4)
    answers = [tiny_tok("Paris is the capital.", add_special_tokens=False)["input_ids"], []]
    kl = backend.kl_to_base(["The capital of France?", "Hi"], answers, progress=False)
    assert set(kl) == {0} and kl[0][1] == len(answers[0]) and kl[0][0] > 0  # an empty answer is not scored
    with pytest.raises(BackendError, match="unknown variant 'tuned'"):
        backend.generate(["Hi"], variant="tuned")


def test_a_backend_that_cannot_score_says_so():
    backend = object.__new__(VLLMBackend)  # no engine needed: scoring is refused before any engine call
    for call in (lambda: backend.loglikelihood(PAIRS), lambda: backend.loglikelihood_rolling(["Hi"]),
                 lambda: backend.kl_to_base(["Hi"], [[1]])):
        with pytest.raises(BackendError, match="the vllm backend cannot compute"):
            call()


def test_vllm_factory_checks_the_patch_before_the_engine(tmp_path):
    from safetypatch.errors import PatchError
    from safetypatch.evals.backend import vllm_backend

    with pytest.raises(PatchError):
        vllm_backend("default", patch=tmp_path / "no_patch_here")
