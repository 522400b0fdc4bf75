"""Module roles (`--target-modules mlp.up`) resolved per architecture, the layer stack found per architecture, and
patches on non-Llama architectures (GPT-2's Conv1D, fused modules) through save / stack / export."""

import logging

import numpy as np
import pytest
import torch

from archs import ARCHITECTURES, UNLISTED, build_arch
from safetypatch.config import PatchShape
from safetypatch.errors import ConfigError, PatchError
from safetypatch.modeling import layer_stack, num_layers, resolve_targets
from safetypatch.patches import (attach_new_patch, export_gguf, export_peft, lora_config, lora_deltas, save_patch,
                                 shape_record, stack_patches)
from test_patch_ops import run_cli

_LLAMA = {"mlp.up": ["up_proj"], "mlp.gate": ["gate_proj"], "mlp.down": ["down_proj"], "attn.q": ["q_proj"],
          "attn.k": ["k_proj"], "attn.v": ["v_proj"], "attn.o": ["o_proj"]}
# architecture -> (layer-stack path, role -> resolved names; a role left out must be refused)
EXPECTED = {
    **{a: ("model.layers", _LLAMA) for a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "granite",
                                             "stablelm")},
    "phi3": ("model.layers", {"mlp.up": ["gate_up_proj"], "mlp.gate": ["gate_up_proj"], "mlp.down": ["down_proj"],
                              "attn.q": ["qkv_proj"], "attn.k": ["qkv_proj"], "attn.v": ["qkv_proj"],
                              "attn.o": ["o_proj"]}),
    "gpt2": ("transformer.h", {"mlp.up": ["c_fc"], "mlp.down": ["mlp.c_proj"], "attn.q": ["c_attn"],
                               "attn.k": ["c_attn"], "attn.v": ["c_attn"], "attn.o": ["attn.c_proj"]}),
    "gpt_neox": ("gpt_neox.layers", {"mlp.up": ["dense_h_to_4h"], "mlp.down": ["dense_4h_to_h"],
                                     "attn.q": ["query_key_value"], "attn.k": ["query_key_value"],
                                     "attn.v": ["query_key_value"], "attn.o": ["dense"]}),
    "opt": ("model.decoder.layers", {"mlp.up": ["fc1"], "mlp.down": ["fc2"], "attn.q": ["q_proj"],
                                     "attn.k": ["k_proj"], "attn.v": ["v_proj"], "attn.o": ["out_proj"]}),
    "gptj": ("transformer.h", {"mlp.up": ["fc_in"], "mlp.down": ["fc_out"], "attn.q": ["q_proj"], "attn.k": ["k_proj"],
                               "attn.v": ["v_proj"], "attn.o": ["out_proj"]}),
    "phi": ("model.layers", {"mlp.up": ["fc1"], "mlp.down": ["fc2"], "attn.q": ["q_proj"], "attn.k": ["k_proj"],
                             "attn.v": ["v_proj"], "attn.o": ["dense"]}),
}
ALL_ROLES = ("mlp.up", "mlp.gate", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")


def test_every_architecture_is_covered():
    assert set(EXPECTED) == set(ARCHITECTURES) | set(UNLISTED)


@pytest.mark.parametrize("arch", ARCHITECTURES + UNLISTED)
def test_roles_resolve_per_architecture(tiny_tok, arch):
    model = build_arch(arch, tiny_tok)
    path, want = EXPECTED[arch]
    layer_modules = resolve_targets(model, ["all-linear"]).layer_modules
    assert layer_stack(model)[0] == path and len(layer_stack(model)[1]) == num_layers(model) == 2
    for role in ALL_ROLES:
        if role in want:
            res = resolve_targets(model, [role])
            assert res.resolved == {role: want[role]} and res.modules == want[role]
            assert res.layers_path == path
        else:  # the architecture has no such module: the error lists the layers' modules and the fix
            with pytest.raises(ConfigError) as e:
                resolve_targets(model, [role])
            msg = str(e.value)
            assert f"role '{role}'" in msg and type(model).__name__ in msg and "--target-modules" in msg
            assert all(name in msg for name in layer_modules)
    # groups: the union of their roles, each module once; all-linear: every linear module of the layers
    mlp = resolve_targets(model, ["mlp"]).modules
    assert mlp == list(dict.fromkeys(n for r in ("mlp.up", "mlp.gate", "mlp.down") for n in want.get(r, [])))
    everything = resolve_targets(model, ["all-linear"])
    assert sorted(everything.modules) == sorted({n for names in want.values() for n in names})
    assert everything.conv1d == (arch == "gpt2")


def test_patch_attaches_to_resolved_modules_only(tiny_tok):
    """GPT-2's two c_proj: `mlp.down` patches mlp.c_proj and not attn.c_proj (a bare `c_proj` would take both)."""
    shape = PatchShape(rank=2, target_modules=["mlp.down"], layers="all")
    model = attach_new_patch(build_arch("gpt2", tiny_tok), shape)
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A"))
    assert wrapped == [f"base_model.model.transformer.h.{i}.mlp.c_proj" for i in (0, 1)]
    raw = attach_new_patch(build_arch("gpt2", tiny_tok), PatchShape(rank=2, target_modules=["c_proj"], layers="all"))
    assert sum(1 for _, m in raw.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")) == 4


def test_fused_module_said_once(tiny_tok, caplog):
    model = build_arch("phi3", tiny_tok)
    with caplog.at_level(logging.WARNING, logger="safetypatch.modeling.roles"):
        res = resolve_targets(model, ["mlp", "attn.q"])
        resolve_targets(model, ["mlp", "attn.q"])
    assert res.modules == ["gate_up_proj", "down_proj", "qkv_proj"]
    assert len(res.notes) == 2 and "mlp.up and mlp.gate -> mlp.gate_up_proj" in res.notes[0]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "fused" in lines[0] and "self_attn.qkv_proj" in lines[0]
    assert resolve_targets(model, ["mlp.down"]).notes == []


def test_raw_names_pass_through_and_bad_names_are_named(tiny_tok):
    model = build_arch("gpt_neox", tiny_tok)
    res = resolve_targets(model, ["dense_h_to_4h", "attention.dense", "mlp.down"])
    assert res.resolved == {"dense_h_to_4h": ["dense_h_to_4h"], "attention.dense": ["attention.dense"],
                            "mlp.down": ["dense_4h_to_h"]}
    with pytest.raises(ConfigError, match=r"'up_proj' is no role and no linear module.*attention.query_key_value"):
        resolve_targets(model, ["up_proj"])


def test_layer_stack_by_config_count():
    """An unlisted layout (blocks under `backbone.stages`) is found by the config's layer count."""
    from transformers import PretrainedConfig

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig(n_layers=3)
            self.backbone = torch.nn.Module()
            self.backbone.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.backbone.stages = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

    toy = Toy()
    assert layer_stack(toy)[0] == "backbone.stages" and num_layers(toy) == 3
    toy.config = PretrainedConfig(n_layers=5)
    with pytest.raises(Exception, match=r"cannot find the decoder layers of Toy.*backbone.stages \(3\)"):
        layer_stack(toy)


def test_lora_config_keeps_llama_identical_and_sets_conv1d(tiny_tok, tiny_model):
    cfg = lora_config(PatchShape(rank=4, target_modules=["mlp.up"], layers="1"), tiny_model)
    assert set(cfg.target_modules) == {"up_proj"} and cfg.layers_to_transform == [1]
    assert cfg.layers_pattern is None and cfg.fan_in_fan_out is False
    gpt2 = lora_config(PatchShape(target_modules=["mlp"], layers="all"), build_arch("gpt2", tiny_tok))
    assert set(gpt2.target_modules) == {"c_fc", "mlp.c_proj"} and gpt2.fan_in_fan_out is True
    with pytest.raises(ConfigError, match="layers: \\[5\\] out of range for a model with 2 layers"):
        lora_config(PatchShape(layers="5"), build_arch("opt", tiny_tok))


def _random_b(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return model


def test_gpt2_conv1d_patch_changes_logits_only_when_b_nonzero(tiny_tok, tmp_path):
    from peft import PeftModel

    ids = torch.tensor([tiny_tok.encode("The capital of France is Paris.")])
    base = build_arch("gpt2", tiny_tok)
    with torch.no_grad():
        want = base(ids).logits.clone()
    model = attach_new_patch(base, PatchShape(rank=2, target_modules=["mlp.up", "attn.o"], layers="all"))
    assert model.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # B = 0: a no-op
        _random_b(model)
        got = model(ids).logits.clone()
    assert (got - want).abs().max() > 1e-3
    shape = shape_record(PatchShape(rank=2, target_modules=["mlp.up", "attn.o"], layers="all"), model)
    assert shape["resolved_modules"] == {"mlp.up": ["c_fc"], "attn.o": ["attn.c_proj"]}
    save_patch(model, tmp_path / "p", {"base_model": {"spec": "tiny-gpt2"}, "shape": shape})
    export_peft(tmp_path / "p", tmp_path / "peft")
    again = PeftModel.from_pretrained(build_arch("gpt2", tiny_tok), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got, rtol=1e-5, atol=1e-5)


def _saved(tiny_tok, arch, path, targets, layers="all", seed=0):
    model = _random_b(attach_new_patch(build_arch(arch, tiny_tok), PatchShape(rank=2, target_modules=targets,
                                                                              layers=layers)), seed)
    shape = shape_record(PatchShape(rank=2, target_modules=targets, layers=layers), model)
    save_patch(model, path, {"base_model": {"spec": f"tiny-{arch}"}, "shape": shape})
    return path


def test_stack_keeps_qualified_targets_and_roles(tiny_tok, tmp_path):
    from peft import PeftModel

    a = _saved(tiny_tok, "gpt2", tmp_path / "a", ["mlp.down"], layers="0", seed=1)
    b = _saved(tiny_tok, "gpt2", tmp_path / "b", ["mlp.up"], layers="1", seed=2)
    meta = stack_patches([a, b], [1.0, -0.5], tmp_path / "s")
    assert meta["shape"]["target_modules"] == ["mlp.down", "mlp.up"]
    assert meta["shape"]["resolved_modules"] == {"mlp.down": ["mlp.c_proj"], "mlp.up": ["c_fc"]}
    config = (tmp_path / "s" / "adapter_config.json").read_text()
    assert '"mlp.c_proj"' in config and '"c_proj"' not in config and '"fan_in_fan_out": true' in config
    model = PeftModel.from_pretrained(build_arch("gpt2", tiny_tok), str(tmp_path / "s"))
    wrapped = {n.split("base_model.model.")[1] for n, m in model.named_modules()
               if hasattr(m, "lora_A") and not n.endswith("lora_A")}
    assert wrapped == {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("mlp.c_proj", "mlp.c_fc")}
    deltas = lora_deltas(tmp_path / "s", fan_in_fan_out_ok=True)
    with pytest.raises(PatchError, match="fan_in_fan_out"):
        lora_deltas(tmp_path / "s")  # callers that add dW to a weight must opt in (Conv1D stores dW^T)
    a0, b0, s0 = lora_deltas(a, fan_in_fan_out_ok=True)["transformer.h.0.mlp.c_proj"]
    a1, b1, s1 = deltas["transformer.h.0.mlp.c_proj"]
    torch.testing.assert_close(s1 * b1 @ a1, s0 * b0 @ a0, rtol=1e-5, atol=1e-6)  # weight 1: the part's dW


def _gguf_tensors(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {t.name: np.asarray(t.data) for t in r.tensors}, r


def test_gguf_export_names_and_layouts(tiny_tok, tmp_path):
    # GPT-NeoX: query_key_value rows reordered exactly as convert_hf_to_gguf's GPTNeoXModel reorders the weight
    p = _saved(tiny_tok, "gpt_neox", tmp_path / "neox", ["attn.q", "mlp.up"])
    export_gguf(p, tmp_path / "neox.gguf", n_head=4)
    t, r = _gguf_tensors(tmp_path / "neox.gguf")
    assert r.get_field("general.architecture").contents() == "gptneox"
    assert set(t) == {f"blk.{i}.{k}.weight.lora_{ab}" for i in (0, 1) for k in ("attn_qkv", "ffn_up") for ab in "ab"}
    a, b, s = lora_deltas(p)["gpt_neox.layers.1.attention.query_key_value"]
    dw = (s * b @ a).numpy()
    qkv = dw.reshape(4, 3, 32 // 4, 32)  # the converter: (n_head, 3, head_dim, n_embd) -> q, k, v blocks
    want = np.concatenate([qkv[:, j].reshape(-1, 32) for j in range(3)], axis=0)
    assert not np.allclose(want, dw)
    alpha = float(r.get_field("adapter.lora.alpha").contents())
    got = alpha / a.shape[0] * t["blk.1.attn_qkv.weight.lora_b"] @ t["blk.1.attn_qkv.weight.lora_a"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # GPT-2: the converter stores Conv1D weights as (out, in), PEFT's B @ A layout: no change; fused c_attn
    p = _saved(tiny_tok, "gpt2", tmp_path / "gpt2", ["attn.q", "mlp.down"])
    export_gguf(p, tmp_path / "gpt2.gguf")
    t, r = _gguf_tensors(tmp_path / "gpt2.gguf")
    a, b, s = lora_deltas(p, fan_in_fan_out_ok=True)["transformer.h.0.mlp.c_proj"]
    alpha = float(r.get_field("adapter.lora.alpha").contents())
    down = alpha / a.shape[0] * t["blk.0.ffn_down.weight.lora_b"] @ t["blk.0.ffn_down.weight.lora_a"]
    np.testing.assert_allclose(down, (s * b @ a).numpy(), rtol=1e-5, atol=1e-6)
    assert "blk.1.attn_qkv.weight.lora_a" in t
    # Phi-3: fused qkv_proj / gate_up_proj are llama.cpp's attn_qkv / ffn_up
    p = _saved(tiny_tok, "phi3", tmp_path / "phi3", ["attn.q", "mlp.up"])
    export_gguf(p, tmp_path / "phi3.gguf")
    assert {n.split(".")[2] for n in _gguf_tensors(tmp_path / "phi3.gguf")[0]} == {"attn_qkv", "ffn_up"}


def test_gguf_export_refuses_unknown_layouts(tiny_tok, tmp_path):
    p = _saved(tiny_tok, "opt", tmp_path / "opt", ["mlp.up"])
    with pytest.raises(PatchError, match="model_type 'opt'.*--format peft"):
        export_gguf(p, tmp_path / "x.gguf")
    with pytest.raises(PatchError, match="fc1: llama.cpp architecture 'llama' has no tensor for it"):
        export_gguf(p, tmp_path / "x.gguf", arch="llama")  # the user's --arch, but OPT's modules are not llama's
    p = _saved(tiny_tok, "phi", tmp_path / "phi", ["mlp.up"])
    with pytest.raises(PatchError, match="--arch phi2: how llama.cpp's converter lays out"):
        export_gguf(p, tmp_path / "x.gguf", arch="phi2")
    assert not (tmp_path / "x.gguf").exists()
    export_peft(p, tmp_path / "phi-peft")  # every architecture exports as PEFT


def test_patch_info_shows_roles(tiny_tok, tmp_path, capsys):
    import json

    p = _saved(tiny_tok, "gpt2", tmp_path / "p", ["mlp.up", "attn.o", "c_attn"])
    assert run_cli(["patch", "info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "modules: mlp.up -> c_fc; attn.o -> attn.c_proj; c_attn" in out
    assert run_cli(["patch", "info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == ["mlp.up", "attn.o", "c_attn"] and info["resolved_modules"]["attn.o"] == ["attn.c_proj"]


def test_check_model_fit_resolves_roles(tiny_tok):
    from safetypatch.training.config import TrainConfig
    from safetypatch.training.step import check_model_fit

    check_model_fit(TrainConfig(target_modules=["mlp.up"], layers="all"), build_arch("opt", tiny_tok))
    with pytest.raises(ConfigError, match=r"role 'mlp.gate' has no module in OPTForCausalLM.*fc1, fc2"):
        check_model_fit(TrainConfig(target_modules=["mlp.gate"], layers="all"), build_arch("opt", tiny_tok))
    assert PatchShape().target_modules == ["mlp.up"]


@pytest.mark.parametrize("arch,name,fused", [("phi3", "q_proj", "qkv_proj"), ("phi3", "up_proj", "gate_up_proj"),
                                             ("gpt_neox", "v_proj", "query_key_value")])
def test_a_part_of_a_fused_module_is_refused_with_the_fused_name(tiny_tok, arch, name, fused):
    with pytest.raises(ConfigError) as e:
        resolve_targets(build_arch(arch, tiny_tok), [name])
    msg = str(e.value)
    assert f"{name} is fused into" in msg and f"--target-modules {fused}" in msg and "cannot be split" in msg
