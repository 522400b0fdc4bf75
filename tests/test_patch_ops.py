import json
import warnings

import pytest
import torch

from support import build_tiny_model
from safetypatch.config import PatchShape
from safetypatch.modeling import fingerprint
from safetypatch.errors import PatchError
from safetypatch.patches import (apply_patch, attach_new_patch, delta_weights, load_patch, lora_deltas, merge_into,
                                 save_patch, scale_patch, stack_patches, unmerge, verify_files)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_patch(tok, path, rank=2, alpha=4.0, modules=("up_proj", "q_proj"), layers="1", seed=0, base_seed=0, **extra):
    """A saved patch with random A and B (PEFT's init has B = 0, which would hide mistakes)."""
    from peft import get_peft_model

    from safetypatch.patches import lora_config

    base = build_tiny_model(tok, seed=base_seed)
    if extra:
        cfg = lora_config(PatchShape(rank=rank, alpha=alpha, target_modules=list(modules), layers=layers), 2)
        for k, v in extra.items():
            setattr(cfg, k, v)
        torch.manual_seed(seed)
        model = get_peft_model(base, cfg)
    else:
        model = attach_new_patch(base, PatchShape(rank=rank, alpha=alpha, target_modules=list(modules), layers=layers),
                                 seed=seed)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    save_patch(model, path, {"base_model": {"spec": "tiny"}, "shape": {"rank": rank, "alpha": alpha}})
    return path


def ids(tok):
    return tok(["Write a poem about the sea", "How do I kill a Python process?"], return_tensors="pt", padding=True)


def logits(model, tok):
    with torch.no_grad():
        return model(**ids(tok)).logits


def patched_logits(tok, patch):
    return logits(load_patch(build_tiny_model(tok), patch), tok)


def base_weights(model):
    return {n: w.detach().clone() for n, w in model.state_dict().items()}


def run_cli(argv):
    """Run `safetypatch ...` through the command line's entry point; returns its exit status."""
    from safetypatch.cli import main

    return main(argv)


# ---------------------------------------------------------------------------------------------- lora_deltas
@pytest.mark.parametrize("extra", [
    {},
    {"rank_pattern": {"up_proj": 3}, "alpha_pattern": {"q_proj": 8.0}},
    {"use_rslora": True},
])
def test_lora_deltas_equal_peft_merge(tiny_tok, tmp_path, extra):
    p = make_patch(tiny_tok, tmp_path / "p", **extra)
    base = build_tiny_model(tiny_tok)
    before = base_weights(base)
    merged = load_patch(base, p).merge_and_unload().state_dict()
    deltas = delta_weights(p)
    assert set(deltas) == {"model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"}
    for module, dw in deltas.items():
        key = module + ".weight"
        torch.testing.assert_close(merged[key] - before[key], dw, rtol=1e-4, atol=1e-5)
    ranks = {m: a.shape[0] for m, (a, _, _) in lora_deltas(p).items()}
    assert ranks["model.layers.1.mlp.up_proj"] == (3 if "rank_pattern" in extra else 2)


def test_lora_deltas_refuse_non_lora(tiny_tok, tmp_path):
    from safetypatch.patches import read_adapter

    config, tensors = read_adapter(make_patch(tiny_tok, tmp_path / "p"))
    with pytest.raises(PatchError, match="DoRA"):
        lora_deltas(({**config, "use_dora": True}, tensors))
    with pytest.raises(PatchError, match="not a LoRA factor"):
        lora_deltas((config, {**tensors, "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(2)}))


# ---------------------------------------------------------------------------------------------- stack
def test_stack_is_exact_weighted_sum(tiny_tok, tmp_path):
    p1 = make_patch(tiny_tok, tmp_path / "p1", rank=2, alpha=4.0, modules=("up_proj", "q_proj"), layers="1", seed=1)
    p2 = make_patch(tiny_tok, tmp_path / "p2", rank=3, alpha=3.0, modules=("down_proj", "v_proj"), layers="0", seed=2)
    p3 = make_patch(tiny_tok, tmp_path / "p3", rank=2, alpha=8.0, modules=("up_proj",), layers="1", seed=3,
                    use_rslora=True)
    weights = [1.0, 0.5, -2.0]
    meta = stack_patches([p1, p2, p3], weights, tmp_path / "s")
    want: dict[str, torch.Tensor] = {}
    for p, w in zip((p1, p2, p3), weights):
        for m, dw in delta_weights(p).items():
            want[m] = want.get(m, 0) + w * dw
    got = delta_weights(tmp_path / "s")
    assert set(want) <= set(got)
    for m, dw in got.items():  # modules no part patches (union of targets x layers) are present but zero
        torch.testing.assert_close(dw, want.get(m, torch.zeros_like(dw)), rtol=1e-5, atol=1e-6)
    assert got["model.layers.0.mlp.up_proj"].abs().max() == 0
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4  # up_proj in layer 1: 2 + 2 ranks
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["layers_to_transform"] is None  # layers 0 and 1: every layer of the 2-layer model
    assert meta["shape"]["layers"] == [0, 1] and meta["shape"]["rank"] == 4
    assert [(s["path"], s["weight"]) for s in meta["stack"]] == [(str(p), w) for p, w in zip((p1, p2, p3), weights)]
    assert meta["stack"][1]["sha256"] == json.loads((p2 / "patch.json").read_text())["weights"]["sha256"]
    assert meta["base_model"]["fingerprint"] == fingerprint(build_tiny_model(tiny_tok))
    assert {"format", "created", "weights"} <= set(meta)
    verify_files(tmp_path / "s")
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]
    by_hand = build_tiny_model(tiny_tok)  # base weights + sum_i w_i dW_i, written in directly
    with torch.no_grad():
        for m, dw in want.items():
            by_hand.get_submodule(m).weight += dw
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stacked = patched_logits(tiny_tok, tmp_path / "s")
    assert not [w for w in caught if "key" in str(w.message).lower()]  # no (module, layer) pair left out of the file
    torch.testing.assert_close(stacked, logits(by_hand, tiny_tok), rtol=1e-4, atol=1e-4)


def test_stack_equals_parts_applied_in_turn(tiny_tok, tmp_path):
    from peft import PeftModel

    p1 = make_patch(tiny_tok, tmp_path / "p1", rank=2, modules=("up_proj", "q_proj"), layers="1", seed=1)
    p2 = make_patch(tiny_tok, tmp_path / "p2", rank=3, alpha=6.0, modules=("up_proj", "o_proj"), layers="1", seed=2)
    stack_patches([p1, p2], None, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["r"] == 5
    first_merged = load_patch(build_tiny_model(tiny_tok), p1).merge_and_unload()
    in_turn = logits(PeftModel.from_pretrained(first_merged, str(p2)), tiny_tok)
    stacked = patched_logits(tiny_tok, tmp_path / "s")
    torch.testing.assert_close(stacked, in_turn, rtol=1e-4, atol=1e-4)
    assert (stacked - logits(build_tiny_model(tiny_tok), tiny_tok)).abs().max() > 1e-3  # the patches do something


def test_stack_with_minus_itself_is_zero(tiny_tok, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES, layers="all")
    assert run_cli(["patch", "stack", str(p), str(p), "--weights", "1,-1", "-o", str(tmp_path / "z")]) == 0
    assert "stacked" in capsys.readouterr().out
    assert max(dw.abs().max().item() for dw in delta_weights(tmp_path / "z").values()) < 1e-6
    base = logits(build_tiny_model(tiny_tok), tiny_tok)
    torch.testing.assert_close(patched_logits(tiny_tok, tmp_path / "z"), base, rtol=1e-5, atol=1e-5)
    assert run_cli(["patch", "stack", str(p), str(p), "--weights", "1", "-o", str(tmp_path / "y")]) == 2
    assert "error: --weights has 1 value(s) for 2 patch(es)" in capsys.readouterr().err


def test_stack_refuses_other_base(tiny_tok, tmp_path):
    p = make_patch(tiny_tok, tmp_path / "p")
    q = make_patch(tiny_tok, tmp_path / "q", base_seed=123)
    with pytest.raises(PatchError, match="different base models:\n  weights_sha256"):
        stack_patches([p, q], [1, 1], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_stack_refuses_existing_output(tiny_tok, tmp_path):
    p = make_patch(tiny_tok, tmp_path / "p")
    with pytest.raises(FileExistsError):
        stack_patches([p], None, p)


# ---------------------------------------------------------------------------------------------- scale
def test_scale(tiny_tok, tmp_path):
    p = make_patch(tiny_tok, tmp_path / "p")
    assert run_cli(["patch", "scale", str(p), "--factor", "0", "-o", str(tmp_path / "zero")]) == 0
    base = logits(build_tiny_model(tiny_tok), tiny_tok)
    torch.testing.assert_close(patched_logits(tiny_tok, tmp_path / "zero"), base)
    meta = scale_patch(p, 2.0, tmp_path / "double")
    assert meta["factor"] == 2.0 and meta["scaled_from"]["path"] == str(p)
    assert meta["scaled_from"]["sha256"] == json.loads((p / "patch.json").read_text())["weights"]["sha256"]
    orig, doubled = delta_weights(p), delta_weights(tmp_path / "double")
    assert set(orig) == set(doubled)
    for m in orig:
        torch.testing.assert_close(doubled[m], 2 * orig[m])
    verify_files(tmp_path / "double")


# ---------------------------------------------------------------------------------------------- merge / apply
def test_merge_unmerge_round_trip_every_module_type(tiny_tok, tmp_path):
    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES, layers="all")
    model = build_tiny_model(tiny_tok)
    before = base_weights(model)
    want = logits(load_patch(build_tiny_model(tiny_tok), p), tiny_tok)
    peft_model = merge_into(model, p)
    base = peft_model.get_base_model()
    merged = {n: w.detach().clone() for n, w in base.state_dict().items()}
    deltas = delta_weights(p)
    assert {m.split(".")[-1] for m in deltas} == set(ALL_MODULES) and len(deltas) == 14
    for m, dw in deltas.items():
        key = m + ".base_layer.weight"
        assert (merged[key] - before[m + ".weight"]).abs().max() > 1e-3
        torch.testing.assert_close(merged[key], before[m + ".weight"] + dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(peft_model, tiny_tok), want, rtol=1e-4, atol=1e-4)
    unmerge(peft_model)
    after = {n.replace(".base_layer", ""): w for n, w in base.state_dict().items() if "lora_" not in n}
    assert set(after) == set(before)
    for n, w in before.items():
        torch.testing.assert_close(after[n], w, rtol=0, atol=1e-6)


def test_apply_writes_loadable_merged_model(tiny_tok, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES, layers="all")
    out = tmp_path / "merged"
    assert run_cli(["patch", "apply", "--model", str(tiny_model_dir), str(p), "-o", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "merged_from.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt"))]
    info = json.loads((out / "merged_from.json").read_text())
    assert info["patch"]["sha256"] == json.loads((p / "patch.json").read_text())["weights"]["sha256"]
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tiny_tok.get_vocab()
    want = patched_logits(tiny_tok, p)
    torch.testing.assert_close(logits(merged, tiny_tok), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError):
        apply_patch(str(tiny_model_dir), p, out)
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]


def test_merge_then_unmerge_cli_restores_base_every_module_type(tiny_tok, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES, layers="all")
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    assert run_cli(["patch", "merge", "--model", str(tiny_model_dir), str(p), "-o", str(merged)]) == 0
    assert run_cli(["patch", "unmerge", "--model", str(merged), str(p), "-o", str(restored)]) == 0
    base, m, r = (load_file(d / "model.safetensors") for d in (tiny_model_dir, merged, restored))
    changed = {k.rsplit(".", 2)[-2] for k in base if not torch.equal(base[k], m[k])}
    assert changed >= set(ALL_MODULES)  # the merge moved every module type ...
    for k in base:  # ... and the unmerge put every weight back
        torch.testing.assert_close(r[k], base[k], rtol=0, atol=1e-5)
    info = json.loads((restored / "unmerged_from.json").read_text())
    assert info["largest_change"] > 0


def test_unmerge_refuses_model_merged_with_another_patch(tiny_tok, tiny_model_dir, tmp_path, capsys):
    p1 = make_patch(tiny_tok, tmp_path / "p1", modules=ALL_MODULES, layers="all")
    p2 = make_patch(tiny_tok, tmp_path / "p2", modules=ALL_MODULES, layers="all", seed=5)
    merged = tmp_path / "merged"
    apply_patch(str(tiny_model_dir), p1, merged)
    assert run_cli(["patch", "unmerge", "--model", str(merged), str(p2), "-o", str(tmp_path / "r")]) == 2
    assert "merged with patch" in capsys.readouterr().err
