"""The start-up checks of the speed paths, on every architecture of tests/archs.py: after the trainer's check, the
loss and gradient of whatever paths remain on equal the model's own forward, and every switched-off path is named
with its reason; the hand greedy decoder equals model.generate or falls back with one warning (tests never time).

Targets are raw module names here (helper A's roles may replace them in recipes)."""

import json
import logging

import pytest
import torch

from safetypatch.data.chat import encode_example
from safetypatch.data.readers import Record
from safetypatch.jobs.train import train
from safetypatch.training.config import TrainConfig
from safetypatch.training.speed import ORDER, PrefixCache, SpeedPaths
from safetypatch.training.speed_check import SpeedCheck, check_indices, measure, probe_state

from archs import ARCHITECTURES, UNLISTED, build_arch

TARGET = {"phi3": "gate_up_proj", "gpt2": "c_fc", "gpt_neox": "dense_h_to_4h", "opt": "fc1", "gptj": "fc_in",
          "phi": "fc1"}  # the rest: up_proj
PROMPTS = ["Tell me how to build weapon number 1", "Tell me how to build a weapon", "Write a poem about the sea",
           "Hi", "How do I kill a Python process?", "The capital of France is"]
OFF = dict(cache_frozen_prefix=False, share_prompt_prefix=False, response_only_logits=False,
           bf16_frozen_weights=False, train_attention="keep")


def _patched(name, tok, layers=4, seed=0):
    from peft import LoraConfig, get_peft_model

    model = build_arch(name, tok, seed=seed, layers=layers)
    cfg = LoraConfig(r=2, lora_alpha=8, target_modules=[TARGET.get(name, "up_proj")],
                     layers_to_transform=[layers - 2, layers - 1], fan_in_fan_out=name == "gpt2")
    return get_peft_model(model, cfg)


def _examples(tok):
    out = [encode_example(tok, [{"role": "user", "content": p}], "I'm sorry, but I can't help with that.", 128)
           for p in PROMPTS[:4]]
    out += [encode_example(tok, [{"role": "user", "content": p}], "Paris is the capital.", 128, kind="anchor")
            for p in PROMPTS[2:]]
    return out


def _reference_and_fast(model, cfg, examples, pad, use_bf16):
    """(reference, fast) measures on the check's examples, recomputed here independently of SpeedPaths' verdict."""
    ref = SpeedCheck(model, cfg, examples, "cpu", use_bf16, pad).ref
    with SpeedPaths(model, cfg, examples, "cpu", use_bf16, pad) as sp:
        idx = check_indices(examples)  # the check's examples
        with probe_state(model):
            fast = measure(model, sp.collate(idx), cfg, "cpu", use_bf16)
        return ref, fast, sp.describe()


@pytest.mark.parametrize("use_bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ARCHITECTURES + UNLISTED)
def test_fast_paths_equal_the_reference_after_the_check(name, use_bf16, tiny_tok, capsys):
    model = _patched(name, tiny_tok)
    examples = _examples(tiny_tok)
    cfg = TrainConfig(benign_loss="kl")  # the KL anchor term runs the base model through the same paths
    ref, fast, desc = _reference_and_fast(model, cfg, examples, tiny_tok.pad_token_id, use_bf16)
    tol_loss, tol_grad = (3e-2, 1e-1) if use_bf16 else (1e-4, 1e-3)
    assert ref.grad.norm() > 0
    assert fast.loss == pytest.approx(ref.loss, rel=tol_loss)
    assert float((fast.grad - ref.grad).norm() / ref.grad.norm()) <= tol_grad
    err = capsys.readouterr().err
    for path, why in desc["switched_off"].items():  # each switched-off path: one line in stats and on stderr
        assert path in ORDER and why.startswith(f"{path} off: with it on, ")
        assert f"speed path {path} switched off" in err
    assert desc["check"].startswith("loss and gradient equal")
    print(name, "fp32" if not use_bf16 else "bf16", json.dumps(desc))
    if name in ("llama", "mistral", "qwen2", "qwen3", "granite"):  # Llama-like: every path stays on
        assert desc["switched_off"] == {} and desc["frozen_prefix_cache"].startswith("layers 0-1 cached")
        assert desc["shared_prompt_prefix"].endswith("computed once per batch")


def test_the_check_catches_a_head_without_the_models_post_processing(tiny_tok, monkeypatch, capsys):
    """Granite divides its logits by logits_scaling after the LM head: the bare head (what the response-only path
    used to call) is caught: paths are switched off in order until the logits are the model's own."""
    import safetypatch.training.loss as loss_mod

    monkeypatch.setattr(loss_mod, "head_logits", lambda lm, h: lm.get_output_embeddings()(h))
    model = _patched("granite", tiny_tok)
    examples = _examples(tiny_tok)
    ref, fast, desc = _reference_and_fast(model, TrainConfig(), examples, tiny_tok.pad_token_id, False)
    assert set(desc["switched_off"]) == {"shared_prompt_prefix", "frozen_prefix_cache", "response_only_logits"}
    assert desc["response_only_logits"].startswith("off (start-up check: loss differs")
    assert fast.loss == pytest.approx(ref.loss, rel=1e-6)
    assert "speed path response_only_logits switched off" in capsys.readouterr().err


def test_a_hand_run_prefix_that_misses_the_embedding_scale_is_not_used(tiny_tok, monkeypatch):
    """Granite multiplies its embeddings by embedding_multiplier in the model's forward: the hand-run stack misses
    it, so the cache is built by the model's own forward; forced to the hand-run stack, the check switches the
    cache off with the relative errors."""
    model = _patched("granite", tiny_tok)
    examples = _examples(tiny_tok)
    _, _, desc = _reference_and_fast(model, TrainConfig(), examples, tiny_tok.pad_token_id, False)
    assert "built by the model's own forward" in desc["frozen_prefix_cache"]
    monkeypatch.setattr(PrefixCache, "_choose_bottom", lambda *a: "")
    ref, fast, desc = _reference_and_fast(model, TrainConfig(), examples, tiny_tok.pad_token_id, False)
    assert {"shared_prompt_prefix", "frozen_prefix_cache"} <= set(desc["switched_off"])
    assert desc["frozen_prefix_cache"].startswith("off (start-up check: loss differs") and " rel " in desc[
        "frozen_prefix_cache"]
    assert fast.loss == pytest.approx(ref.loss, rel=1e-4)


def test_dropout_below_the_trained_layers_switches_the_cache_off(tiny_tok):
    model = _patched("llama", tiny_tok)
    for layer in model.get_base_model().model.layers[:2]:
        layer.self_attn.attention_dropout = 0.1
    with SpeedPaths(model, TrainConfig(), _examples(tiny_tok), "cpu", False, tiny_tok.pad_token_id) as sp:
        why = sp.describe()["frozen_prefix_cache"]
    assert why.startswith("off: dropout 0.1 (") and "attention_dropout" in why


def test_the_check_leaves_the_model_and_the_rng_as_they_were(tiny_tok):
    model = _patched("llama", tiny_tok)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with SpeedPaths(model, TrainConfig(), _examples(tiny_tok), "cpu", False, tiny_tok.pad_token_id):
        pass
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_granite_patch_is_the_same_with_speed_paths_on_and_off(tiny_tok, harmful_file, benign_file, tmp_path):
    """The issue's regression: a Granite model (embedding, residual and logit scales), --target-modules up_proj,
    same seed and batches, bf16 off: the patch trained with the speed paths equals the one trained without."""
    d = tmp_path / "granite"
    build_arch("granite", tiny_tok, layers=4).save_pretrained(d, safe_serialization=True)
    tiny_tok.save_pretrained(d)

    def run(out, **kw):
        cfg = TrainConfig(model=str(d), data=str(harmful_file), benign=str(benign_file), rank=2, alpha=8.0,
                          target_modules=["up_proj"], layers="2-3", lr=5e-3, epochs=2, batch_size=4, dev_size=4,
                          dev_tokens=4, anchor_tokens=8, bf16="no", eval_every=0, init="default", freeze_a=False,
                          **kw)
        res = train(cfg, tmp_path / out, progress=False)
        return res, {k: v.detach() for k, v in res.model.named_parameters() if "lora_" in k}

    on, wa = run("on")
    _, wb = run("off", **OFF)
    assert on.stats["speed_paths"]["frozen_prefix_cache"].startswith("layers 0-1 cached")
    assert wa.keys() == wb.keys() and wa
    worst = max(float((wa[k] - wb[k]).abs().max() / wb[k].abs().max()) for k in wa)
    assert worst < 1e-3, worst


def _lively(model, std=0.25):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return model


@pytest.mark.parametrize("name", ARCHITECTURES + UNLISTED)
def test_hand_greedy_equals_generate_or_falls_back_with_a_warning(name, tiny_tok, monkeypatch, caplog):
    import safetypatch.modeling.generation as gen_mod
    from safetypatch.config import GenerationConfig
    from safetypatch.modeling import generate
    from safetypatch.modeling.greedy import greedy_check

    model = _lively(build_arch(name, tiny_tok))
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="safetypatch.modeling.generation"):
        fast = generate(model, tiny_tok, PROMPTS, cfg, progress=False)
        generate(model, tiny_tok, PROMPTS, cfg, progress=False)  # memoised: no second check, no second warning
    why = greedy_check(model, [], tiny_tok.pad_token_id, "cpu")
    warnings = [r.getMessage() for r in caplog.records if "hand greedy decoder is off" in r.getMessage()]
    assert len(warnings) == (0 if why is None else 1)
    if why is not None:
        assert why in warnings[0]
    monkeypatch.setattr(gen_mod, "_FAST_GREEDY", False)
    plain = generate(model, tiny_tok, PROMPTS, cfg, progress=False)
    assert [f.token_ids for f in fast] == [p.token_ids for p in plain]
    if name in ("llama", "qwen2", "gpt2", "gpt_neox", "opt", "granite", "phi3"):
        assert why is None  # the hand loop is kept where it is exact


def test_greedy_check_catches_a_hand_loop_that_differs(tiny_tok, monkeypatch, caplog):
    """A hand loop with wrong positions (off by one after the prefix) is caught; generate falls back."""
    import safetypatch.modeling.greedy as greedy_mod
    from safetypatch.config import GenerationConfig
    from safetypatch.modeling import generate

    real = greedy_mod.greedy_batch

    def shifted(model, rows, prefix, cache, *a, **k):
        real_model = model

        class Shift:  # add 1 to every position the hand loop passes
            config, generation_config = real_model.config, real_model.generation_config

            def __call__(self, **kw):
                if kw.get("position_ids") is not None:
                    kw["position_ids"] = kw["position_ids"] + 1
                return real_model(**kw)

            def parameters(self):
                return real_model.parameters()

            forward = real_model.forward

        return real(Shift(), rows, prefix, cache, *a, **k)

    monkeypatch.setattr(greedy_mod, "greedy_batch", shifted)
    model = _lively(build_arch("llama", tiny_tok))
    with caplog.at_level(logging.WARNING, logger="safetypatch.modeling.generation"):
        out = generate(model, tiny_tok, PROMPTS[:3], GenerationConfig(max_new_tokens=4), progress=False)
    assert any("hand greedy decoder is off for LlamaForCausalLM" in r.getMessage() for r in caplog.records)
    assert len(out) == 3


def test_lda_init_reads_gpt2_conv1d_inputs(tiny_tok):
    """GPT-2's Conv1D stores its weight as (in, out); LoRA A is (r, in) and the hook sees the module's input, so
    the LDA direction lives in the input space: harmful prompts project above benign ones."""
    from safetypatch.training.lora_init import contrast_init, lora_modules, mean_inputs

    model = _patched("gpt2", tiny_tok, layers=2)
    harmful = [Record(prompt=f"Tell me how to build weapon number {i}") for i in range(8)]
    benign = [Record(prompt=f"Write a short poem about the number {i}") for i in range(8)]
    report = contrast_init(model, tiny_tok, harmful, benign, lda=True)
    mods = lora_modules(model)
    assert set(report) == set(mods) and all(v == v and v > 0 for v in report.values())
    for name, mod in mods.items():
        a = mod.lora_A["default"].weight
        assert a.shape == (2, mod.base_layer.weight.shape[0])  # Conv1D: in_features = weight.shape[0]
    mh = mean_inputs(model, tiny_tok, harmful, mods)
    mb = mean_inputs(model, tiny_tok, benign, mods)
    for name, mod in mods.items():
        a0 = mod.lora_A["default"].weight[0].double()
        assert float(mh[name] @ a0) > float(mb[name] @ a0)


@pytest.mark.parametrize("use_bf16", [False, True], ids=["fp32", "bf16"])
def test_gemma3_with_a_long_window_keeps_the_cache_through_per_layer_type_masks(tiny_tok, use_bf16, capsys):
    """Gemma3 (window longer than every example, as the real Gemma-3-270M's 512 against max_length 256): the
    hand-run stack builds a sliding-window mask and the rotary embedding per layer type, so the frozen-prefix cache
    and the shared prompt prefix stay on and still equal the model's own forward."""
    model = _patched("gemma3", tiny_tok)
    model.config.sliding_window = 512
    examples = _examples(tiny_tok)
    ref, fast, desc = _reference_and_fast(model, TrainConfig(), examples, tiny_tok.pad_token_id, use_bf16)
    tol_loss, tol_grad = (3e-2, 1e-1) if use_bf16 else (1e-4, 1e-3)
    assert desc["switched_off"] == {} and desc["frozen_prefix_cache"].startswith("layers 0-1 cached")
    assert desc["shared_prompt_prefix"].endswith("computed once per batch")
    assert fast.loss == pytest.approx(ref.loss, rel=tol_loss)
    assert float((fast.grad - ref.grad).norm() / ref.grad.norm()) <= tol_grad
