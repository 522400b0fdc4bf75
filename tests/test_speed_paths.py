"""Trainer speed paths: each one switched on and off on a tiny model gives the same loss (tests never time)."""

import json

import pytest
import torch

from safetypatch.errors import ConfigError
from safetypatch.training.config import TrainConfig
from safetypatch.jobs.train import train

from support import build_tiny_model


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tiny_tok):
    """A 4-layer tiny Llama, so that a patch on layers 2-3 leaves two frozen layers below it."""
    d = tmp_path_factory.mktemp("tiny-llama-4")
    build_tiny_model(tiny_tok, layers=4).save_pretrained(d, safe_serialization=True)
    tiny_tok.save_pretrained(d)
    return d


def _cfg(model_dir, harmful_file, benign_file, **kw):
    base = dict(model=str(model_dir), data=str(harmful_file), benign=str(benign_file), rank=2, alpha=8.0,
                target_modules=["up_proj"], layers="2-3", lr=5e-3, epochs=2, batch_size=4, dev_size=4,
                dev_tokens=4, anchor_tokens=8, bf16="no", eval_every=0, init="default", freeze_a=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _run(tmp_path, name, *args, **kw):
    res = train(_cfg(*args, **kw), tmp_path / name, progress=False)
    return res, _losses(tmp_path / name)


@pytest.mark.parametrize("extra", [{}, {"benign_loss": "kl"}, {"response_only_logits": False},
                                   {"init": "lda", "freeze_a": True}])
def test_frozen_prefix_cache_gives_the_same_loss(deep_model_dir, harmful_file, benign_file, tmp_path, extra):
    on, la = _run(tmp_path, "on", deep_model_dir, harmful_file, benign_file, cache_frozen_prefix=True, **extra)
    off, lb = _run(tmp_path, "off", deep_model_dir, harmful_file, benign_file, cache_frozen_prefix=False, **extra)
    assert on.stats["speed_paths"]["frozen_prefix_cache"].startswith("layers 0-1 cached")
    assert off.stats["speed_paths"]["frozen_prefix_cache"] == "off"
    assert len(la) == len(lb) == 16 and la[0] > 0  # 12 refusals + 12 recovery examples + 8 anchors, 2 epochs
    assert la == pytest.approx(lb, rel=1e-4, abs=2e-5)  # train_log rounds losses to 1e-5
    wa = {k: v for k, v in on.model.named_parameters() if "lora_B" in k}
    wb = {k: v for k, v in off.model.named_parameters() if "lora_B" in k}
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=5e-5)  # 16 fp32 steps of drift


def test_prefix_cache_bf16_storage_and_size_check(deep_model_dir, harmful_file, benign_file, tmp_path):
    _, ref = _run(tmp_path, "ref", deep_model_dir, harmful_file, benign_file, cache_frozen_prefix=False)
    half, lh = _run(tmp_path, "half", deep_model_dir, harmful_file, benign_file, prefix_cache_dtype="bfloat16")
    assert "bfloat16" in half.stats["speed_paths"]["frozen_prefix_cache"]
    assert lh == pytest.approx(ref, rel=2e-2)
    big, lbig = _run(tmp_path, "big", deep_model_dir, harmful_file, benign_file, prefix_cache_max_mb=1e-6)
    assert "prefix_cache_max_mb" in big.stats["speed_paths"]["frozen_prefix_cache"]  # too big: recomputed instead
    assert lbig == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_nothing_to_cache_when_the_first_layer_is_patched(tiny_model_dir, harmful_file, benign_file, tmp_path):
    res, _ = _run(tmp_path, "r", tiny_model_dir, harmful_file, benign_file, layers="all", epochs=1)
    assert "first layer is trained" in res.stats["speed_paths"]["frozen_prefix_cache"]


def test_full_finetuning_caches_below_the_trained_layers(deep_model_dir, harmful_file, benign_file, tmp_path):
    on, la = _run(tmp_path, "on", deep_model_dir, harmful_file, benign_file, method="full", layers="3", epochs=1)
    off, lb = _run(tmp_path, "off", deep_model_dir, harmful_file, benign_file, method="full", layers="3", epochs=1,
                   cache_frozen_prefix=False)
    assert on.stats["speed_paths"]["frozen_prefix_cache"].startswith("layers 0-2 cached")
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)


def test_forward_from_layer_matches_the_full_decoder_with_padding(tiny_tok):
    from safetypatch.modeling import unwrap_lm
    from safetypatch.training.forward import forward_from_layer

    model = build_tiny_model(tiny_tok, layers=4)
    ids = torch.randint(3, len(tiny_tok), (3, 11))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0  # right padding, as the trainer's collate makes it
    attn[2, 4:] = 0
    dec = unwrap_lm(model).get_decoder()
    with torch.no_grad():
        ref = dec(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        h = dec.embed_tokens(ids)
        for start in (0, 2):
            if start:
                from safetypatch.training.speed import PrefixCache

                pc = PrefixCache.__new__(PrefixCache)
                pc.start, pc.shared = 2, 0
                h_in = pc.bottom(unwrap_lm(model), ids, attn)
            else:
                h_in = h
            got = forward_from_layer(unwrap_lm(model), h_in, attn, start)
            m = attn.bool()
            torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)


def test_bf16_frozen_weights_give_the_same_loss_and_are_restored(deep_model_dir, harmful_file, benign_file,
                                                                 tmp_path):
    on, la = _run(tmp_path, "on", deep_model_dir, harmful_file, benign_file, bf16="yes", bf16_frozen_weights=True,
                  train_attention="keep", epochs=1)
    off, lb = _run(tmp_path, "off", deep_model_dir, harmful_file, benign_file, bf16="yes", bf16_frozen_weights=False,
                   train_attention="keep", epochs=1)
    assert on.stats["speed_paths"]["bf16_frozen_weights"] != "off"
    assert off.stats["speed_paths"]["bf16_frozen_weights"] == "off"
    # autocast casts the fp32 weights to the same bf16 values the copies hold: the matmuls are identical
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-7)
    assert all(p.dtype == torch.float32 for p in on.model.parameters())  # fp32 weights back after training


def test_eager_attention_while_training_gives_the_same_loss(deep_model_dir, harmful_file, benign_file, tmp_path):
    ea, la = _run(tmp_path, "eager", deep_model_dir, harmful_file, benign_file, bf16="yes", train_attention="auto",
                  epochs=1)
    sd, lb = _run(tmp_path, "sdpa", deep_model_dir, harmful_file, benign_file, bf16="yes", train_attention="keep",
                  epochs=1)
    assert ea.stats["speed_paths"]["train_attention"] == "eager"
    assert la == pytest.approx(lb, rel=2e-2)
    assert ea.model.get_base_model().config._attn_implementation == sd.model.get_base_model().config._attn_implementation
    _, lc = _run(tmp_path, "fp32", deep_model_dir, harmful_file, benign_file, train_attention="eager", epochs=1)
    _, ld = _run(tmp_path, "fp32k", deep_model_dir, harmful_file, benign_file, train_attention="sdpa", epochs=1)
    assert lc == pytest.approx(ld, rel=1e-4, abs=1e-6)


def test_padding_does_not_leak_between_examples_of_a_batch(deep_model_dir, harmful_file, benign_file, tiny_tok):
    """Length-grouped right-padded batches: an example's per-token loss is the same alone or with others."""
    import torch.nn.functional as F

    from safetypatch.modeling import load_model
    from safetypatch.training.examples import build_examples, collate
    from safetypatch.training.loss import response_logits

    cfg = _cfg(deep_model_dir, harmful_file, benign_file)
    model, tok = load_model(str(deep_model_dir))
    examples, _, _ = build_examples(cfg, model, tok)
    longest = max(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    shortest = min(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    assert len(examples[longest].input_ids) > len(examples[shortest].input_ids)
    with torch.no_grad():
        def ce(idx):
            logits, targets, rows = response_logits(model, collate(examples, idx, tok.pad_token_id), True)
            return F.cross_entropy(logits, targets, reduction="none"), rows

        alone, _ = ce([shortest])
        together, rows = ce([longest, shortest])
    torch.testing.assert_close(together[rows == 1], alone, rtol=1e-5, atol=1e-6)


def test_train_step_and_speed_paths_are_usable_outside_train(deep_model_dir, harmful_file, benign_file):
    """The benchmark drives training through SpeedPaths + train_step; they restore the model afterwards."""
    from transformers import get_scheduler

    from safetypatch.modeling import load_model
    from safetypatch.training.examples import batches, build_examples
    from safetypatch.training.speed import SpeedPaths
    from safetypatch.training.step import prepare_model, train_step

    cfg = _cfg(deep_model_dir, harmful_file, benign_file, bf16="yes")
    model, tok = load_model(str(deep_model_dir))
    examples, _, _ = build_examples(cfg, model, tok)
    model = prepare_model(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = get_scheduler("constant", opt)
    with SpeedPaths(model, cfg, examples, "cpu", True, tok.pad_token_id) as sp:
        losses = [train_step(model, [sp.collate(idx)], cfg, opt, sched, params, device="cpu", use_bf16=True)[0]
                  for idx in batches(examples, 4, 0, 0, True)]
        assert sp.prefix is not None and sp.prefix.active
        assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert all(loss > 0 for loss in losses)


def test_speed_fields_are_validated():
    with pytest.raises(ConfigError, match="prefix_cache_dtype"):
        TrainConfig(prefix_cache_dtype="int8").validate()
    with pytest.raises(ConfigError, match="train_attention"):
        TrainConfig(train_attention="flash").validate()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_prefix_gives_the_full_decoders_states_and_gradients(tiny_tok, attn):
    """Rows that share their first tokens: running those once and attending to their cached keys / values gives
    the same hidden states and the same gradients (through the shared part too) as running every row whole."""
    from safetypatch.modeling import unwrap_lm
    from safetypatch.training.forward import forward_from_layer

    model = build_tiny_model(tiny_tok, layers=4)
    model.set_attn_implementation(attn)
    lm = unwrap_lm(model)
    ids = torch.randint(3, len(tiny_tok), (3, 12))
    ids[:, :5] = ids[0, :5]  # five shared leading tokens
    attn_mask = torch.ones_like(ids)
    attn_mask[1, 9:] = 0  # right padding
    attn_mask[2, 7:] = 0
    m = attn_mask.bool()
    h0 = lm.get_decoder().embed_tokens(ids).detach()
    outs, grads = [], []
    for shared in (0, 5):
        h = h0.clone().requires_grad_(True)
        model.zero_grad()
        out = forward_from_layer(lm, h, attn_mask, 1, shared=shared)
        (out[m] ** 2).sum().backward()
        outs.append(out[m].detach())
        grads.append((h.grad[m].clone(), lm.get_decoder().layers[2].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    # the shared tokens' gradient is the sum over rows; row 0 carries it in the shared path, so compare the sums
    g0 = h0.new_zeros(h0.shape)
    g0[m] = grads[0][0]
    g1 = h0.new_zeros(h0.shape)
    g1[m] = grads[1][0]
    torch.testing.assert_close(g1[0, :5], g0[:, :5].sum(0), rtol=1e-3, atol=1e-4)  # summed in another order
    torch.testing.assert_close(g1[:, 5:], g0[:, 5:], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-4)


def test_shared_prompt_prefix_gives_the_same_loss(deep_model_dir, harmful_file, benign_file, tmp_path):
    on, la = _run(tmp_path, "on", deep_model_dir, harmful_file, benign_file, share_prompt_prefix=True)
    off, lb = _run(tmp_path, "off", deep_model_dir, harmful_file, benign_file, share_prompt_prefix=False)
    assert on.stats["speed_paths"]["shared_prompt_prefix"].endswith("tokens computed once per batch")
    assert off.stats["speed_paths"]["shared_prompt_prefix"] == "off"
    assert la == pytest.approx(lb, rel=1e-4, abs=2e-5)
    nocache, _ = _run(tmp_path, "nocache", deep_model_dir, harmful_file, benign_file, cache_frozen_prefix=False,
                      epochs=1)
    assert nocache.stats["speed_paths"]["shared_prompt_prefix"] == "needs the frozen-prefix cache"


def test_shared_prefix_length():
    from safetypatch.data.chat import Encoded
    from safetypatch.training.forward import shared_prefix_length

    def ex(*ids):
        return Encoded(input_ids=list(ids), labels=list(ids), kind="refusal")

    assert shared_prefix_length([ex(1, 2, 3, 4, 5, 6, 7), ex(1, 2, 3, 4, 5, 9, 9, 9)]) == 5
    assert shared_prefix_length([ex(1, 2, 3, 4, 5, 6), ex(1, 2, 3, 4, 5, 6)]) == 5  # a row keeps >= 1 own token
    assert shared_prefix_length([ex(1, 2, 3, 4, 5, 6), ex(1, 2, 0, 4, 5, 6)]) == 0  # fewer than 4: not worth it
    assert shared_prefix_length([]) == 0


def test_trainer_records_the_allocator_setting(deep_model_dir, harmful_file, benign_file, tmp_path):
    from safetypatch.training.malloc import tune_malloc

    on, _ = _run(tmp_path, "on", deep_model_dir, harmful_file, benign_file)
    off, _ = _run(tmp_path, "off", deep_model_dir, harmful_file, benign_file, tune_malloc=False)
    assert on.stats["speed_paths"]["malloc"] == tune_malloc()
    assert off.stats["speed_paths"]["malloc"] == "off"
