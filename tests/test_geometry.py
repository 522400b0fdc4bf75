"""Geometry analysis: planted constructions with known answers, LoRA / full updates, analyze() and its CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import safetypatch.geometry as g
from safetypatch.config import PatchShape
from safetypatch.modeling import SVDCache

D_OUT, D_IN, K = 64, 48, 8


@pytest.fixture(scope="module")
def planted():
    """W0 = U diag(S) V^T with known orthonormal U (64x48), V (48x48) and distinct singular values."""
    gen = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(D_OUT, D_OUT, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float64))[0]
    s = torch.linspace(10.0, 1.0, D_IN, dtype=torch.float64)
    return u, s, v, u[:, :D_IN] @ torch.diag(s) @ v.T


def _m(n, seed=0):
    return torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_update_inside_top_k_subspace(planted):
    u, _, v, w0 = planted
    dw = u[:, :K] @ _m(K) @ v[:, :K].T
    m = g.weight_metrics(w0, dw, ks=(K,))
    for key in ("energy_left", "energy_right", "energy_two", "pa_max", "pa_mean"):
        assert m[f"{key}_k{K}"] == pytest.approx(1.0, abs=1e-9), key
    assert m[f"random_energy_left_k{K}"] == pytest.approx(K / D_OUT)
    assert m[f"random_energy_right_k{K}"] == pytest.approx(K / D_IN)
    assert m[f"random_energy_two_k{K}"] == pytest.approx(K * K / (D_OUT * D_IN))
    assert m[f"random_pa_mean_k{K}"] < 0.8  # a random 8-dim subspace is far from V_8 in R^48
    # a rank-1 update along one of W0's top singular directions: Sim = 1, at k=8 but not at k=1
    rank1 = 0.3 * torch.outer(u[:, 3], v[:, 3])
    m1 = g.weight_metrics(w0, rank1, ks=(1, K))
    assert m1[f"sim_k{K}"] == pytest.approx(1.0, abs=1e-9)
    assert m1["sim_k1"] == pytest.approx(0.0, abs=1e-9)
    assert m1["energy_right_k1"] == pytest.approx(0.0, abs=1e-9)
    assert m1[f"random_sim_k{K}"] < 0.6


def test_update_orthogonal_to_top_k(planted):
    u, _, v, w0 = planted
    dw = u[:, K:D_IN] @ _m(D_IN - K, 2) @ v[:, K:].T
    m = g.weight_metrics(w0, dw, ks=(K,))
    for key in ("energy_left", "energy_right", "energy_two", "sim", "pa_max", "pa_mean"):
        assert m[f"{key}_k{K}"] == pytest.approx(0.0, abs=1e-9), key
    # left/right are separate: top-k on the left, orthogonal on the right
    mixed = g.weight_metrics(w0, u[:, :K] @ _m(K, 3) @ v[:, K:2 * K].T, ks=(K,))
    assert mixed[f"energy_left_k{K}"] == pytest.approx(1.0, abs=1e-9)
    assert mixed[f"energy_right_k{K}"] == pytest.approx(0.0, abs=1e-9)
    assert mixed[f"energy_two_k{K}"] == pytest.approx(0.0, abs=1e-9)
    # left null space of W0 (columns 48..63 of u): left energy 0 at any k
    null = g.weight_metrics(w0, torch.outer(u[:, 50], v[:, 0]), ks=(K,))
    assert null[f"energy_left_k{K}"] == pytest.approx(0.0, abs=1e-9)
    assert null[f"energy_right_k{K}"] == pytest.approx(1.0, abs=1e-9)


def test_random_update_is_at_chance(planted):
    *_, w0 = planted
    gen = torch.Generator().manual_seed(5)
    ms = [g.weight_metrics(w0, torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64), ks=(K,), seed=i)
          for i in range(4)]
    for key, tol in (("energy_left", 0.03), ("energy_right", 0.04), ("energy_two", 0.01), ("pa_mean", 0.15),
                     ("sim", 0.15)):
        mean = sum(m[f"{key}_k{K}"] for m in ms) / len(ms)
        assert mean == pytest.approx(ms[0][f"random_{key}_k{K}"], abs=tol), key


def test_ranks(planted):
    u, _, v, w0 = planted
    m = g.weight_metrics(w0, 2.0 * torch.outer(u[:, 0], v[:, 5]), ks=(1,))
    assert m["rank"] == 1
    assert m["stable_rank"] == pytest.approx(1.0, abs=1e-9)
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["spectral"] == pytest.approx(2.0) and m["fro"] == pytest.approx(2.0)
    assert m["rel_fro"] == pytest.approx(2.0 / float(w0.norm()))
    eye = 3.0 * torch.eye(D_OUT, D_IN, dtype=torch.float64)
    m = g.weight_metrics(w0, eye, ks=(1,))
    assert m["rank"] == D_IN
    assert m["stable_rank"] == pytest.approx(D_IN)
    assert m["effective_rank"] == pytest.approx(D_IN)
    # two equal singular values and one half as big: erank = exp(H(0.4, 0.4, 0.2))
    three = torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, 1], v[:, 1]) + 0.5 * torch.outer(u[:, 2], v[:, 2])
    m = g.weight_metrics(w0, three, ks=(1,))
    assert m["effective_rank"] == pytest.approx(math.exp(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))))
    assert m["stable_rank"] == pytest.approx(2.25)


def test_every_overlap_key_has_random_twin(planted):
    u, _, v, w0 = planted
    ks = (1, 8, 32, 100)  # 100 > min(d_out, d_in): capped
    m = g.weight_metrics(w0, torch.outer(u[:, 0], v[:, 0]), ks=ks)
    keys = g.overlap_keys(ks)
    assert len(keys) == 6 * len(ks) + 1
    for key in keys:
        assert key in m and f"random_{key}" in m, key
    assert m["random_energy_right_k100"] == pytest.approx(1.0)
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_intruder_dimensions(planted):
    u, _, v, w0 = planted
    # a large update along a direction outside W0's column space becomes a top singular vector: an intruder
    m = g.weight_metrics(w0, 30.0 * torch.outer(u[:, 55], v[:, 7]), ks=(1,))
    assert m["intruders"] == 1
    # an equally large update along W0's own top direction, or a small one, creates none
    assert g.weight_metrics(w0, 30.0 * torch.outer(u[:, 0], v[:, 0]), ks=(1,))["intruders"] == 0
    small = g.weight_metrics(w0, 0.1 * torch.outer(u[:, 55], v[:, 7]), ks=(1,))
    assert small["intruders"] == 0 and small["random_intruders"] == 0
    # the random baseline is a Gaussian update of the same Frobenius norm: it grows with the norm
    assert m["random_intruders"] >= small["random_intruders"]


def test_zero_update_gives_nan_not_crash(planted):
    *_, w0 = planted
    m = g.weight_metrics(w0, torch.zeros_like(w0), ks=(K,))
    assert m["fro"] == 0 and m["rank"] == 0 and math.isnan(m[f"sim_k{K}"])
    assert m[f"random_energy_left_k{K}"] == pytest.approx(K / D_OUT)


# --------------------------------------------------------------------------------- LoRA and full updates
def _random_lora(peft_model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft_model


def _layer_module(peft_model, layer, module):
    return peft_model.base_model.model.model.layers[layer].get_submodule(module)


@pytest.mark.parametrize("extra", [{}, {"rank_pattern": {"up_proj": 4}, "alpha_pattern": {"q_proj": 3.0}},
                                   {"use_rslora": True}])
def test_lora_updates_equal_scaled_BA(tiny_tok, tmp_path, extra):
    from peft import LoraConfig, get_peft_model

    from safetypatch.patches import attach_new_patch, save_patch
    from support import build_tiny_model

    if extra:
        cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["up_proj", "q_proj"], task_type="CAUSAL_LM", **extra)
        pm = get_peft_model(build_tiny_model(tiny_tok), cfg)
    else:
        pm = attach_new_patch(build_tiny_model(tiny_tok),
                              PatchShape(rank=2, alpha=8, target_modules=["up_proj", "q_proj"], layers="all"))
    _random_lora(pm)
    save_patch(pm, tmp_path / "p", meta={})
    ups = g.lora_updates(tmp_path / "p")
    assert set(ups) == {(i, m) for i in (0, 1) for m in ("mlp.up_proj", "self_attn.q_proj")}
    for (layer, module), dw in ups.items():
        mod = _layer_module(pm, layer, module)
        a, b = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
        r = a.shape[0]
        alpha = 3.0 if "q_proj" in module and extra.get("alpha_pattern") else 8.0
        scale = alpha / math.sqrt(r) if extra.get("use_rslora") else alpha / r
        assert dw.dtype == torch.float64
        torch.testing.assert_close(dw, scale * b @ a)
        torch.testing.assert_close(dw, mod.get_delta_weight("default").double(), rtol=1e-5, atol=1e-6)
    if extra.get("rank_pattern"):
        assert _layer_module(pm, 0, "mlp.up_proj").lora_A["default"].weight.shape[0] == 4


def test_full_updates_finds_exactly_changed_weights(tiny_tok):
    import copy

    from support import build_tiny_model

    base = build_tiny_model(tiny_tok)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5
        ft.model.layers[0].self_attn.k_proj.weight.mul_(1.01)
        ft.model.layers[0].input_layernorm.weight.add_(1.0)  # 1-D: not a matrix, ignored
    ups = g.full_updates(base, ft)
    assert set(ups) == {(1, "mlp.down_proj"), (0, "self_attn.k_proj")}
    dw = ups[(1, "mlp.down_proj")]
    assert dw.shape == base.model.layers[1].mlp.down_proj.weight.shape
    assert dw[3, 5] == pytest.approx(0.5, abs=1e-6) and int((dw != 0).sum()) == 1
    assert set(g.full_updates(base, ft, modules=["k_proj"])) == {(0, "self_attn.k_proj")}
    assert g.full_updates(base, copy.deepcopy(base)) == {}


def test_svd_cache_is_safetensors_and_checked(planted, tmp_path, tiny_tok):
    from support import build_tiny_model

    *_, w0 = planted
    cache = SVDCache(build_tiny_model(tiny_tok))
    assert cache.dir.parent.name == "svd"
    u, s, vh = cache.get("w", w0)
    f = cache.path("w")
    assert f.exists() and f.suffix == ".safetensors"
    u2, s2, vh2 = cache.get("w", w0)  # from disk
    torch.testing.assert_close(s2, s, rtol=1e-6, atol=1e-6)
    other = w0 * 2
    assert float(cache.get("w", other)[1][0]) == pytest.approx(2 * float(s[0]))  # stale entry recomputed


# --------------------------------------------------------------------------------- analyze + CLI
def _saved_patch(model_dir, out, seed=0):
    from safetypatch.modeling import load_model
    from safetypatch.patches import attach_new_patch, save_patch

    model, _ = load_model(str(model_dir))
    pm = _random_lora(attach_new_patch(model, PatchShape(rank=2, alpha=4, target_modules=["up_proj", "v_proj"],
                                                         layers="all")), seed)
    save_patch(pm, out, meta={"base_model": {"spec": str(model_dir)}})
    return out


def test_analyze_patch_writes_files(tiny_model_dir, tmp_path, capsys):
    import os
    from pathlib import Path

    patch = _saved_patch(tiny_model_dir, tmp_path / "patch")
    out = tmp_path / "geo"
    recs = g.analyze(str(tiny_model_dir), patch=str(patch), ks=(1, 4), out_dir=out,
                     prompts_harmful=["how do I build a weapon", "make poison"], prompts_benign=["bake bread"])
    data = json.loads((out / "geometry.json").read_text())
    assert len(data) == len(recs) == 4
    want = {(i, m) for i in (0, 1) for m in ("mlp.up_proj", "self_attn.v_proj")}
    assert {(r["layer"], r["module"]) for r in data} == want
    for r in data:
        assert r["rank"] == 2 and r["fro"] > 0
        for key in g.overlap_keys((1, 4)):
            assert f"random_{key}" in r
    shift = json.loads((out / "shift.json").read_text())
    assert len(shift["harmful"]) == len(shift["benign"]) == 2 and shift["n_harmful"] == 2
    assert all(x > 0 for x in shift["harmful"] + shift["benign"])
    for png in ("overlap_heatmap.png", "shift.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((Path(os.environ["SAFETYPATCH_HOME"]) / "svd").glob("*/*.safetensors"))
    g.print_table(recs)
    assert "mlp.up_proj" in capsys.readouterr().out


def test_hidden_shift_zero_for_noop_patch(tiny_tok):
    from safetypatch.patches import attach_new_patch
    from support import build_tiny_model

    pm = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=1, target_modules=["up_proj"], layers="all"))
    assert g.hidden_shift(pm, tiny_tok, ["hello"]) == pytest.approx([0.0, 0.0], abs=1e-7)
    _random_lora(pm)
    shift = g.hidden_shift(pm, tiny_tok, ["hello", "bake bread"])
    assert len(shift) == 2 and all(x > 1e-4 for x in shift)


def test_cli_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, safetypatch.cli.analyze; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _parser():
    from safetypatch.cli.analyze import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_analyze_finetuned(tiny_model_dir, tiny_tok, tmp_path, capsys):
    from safetypatch.modeling import load_model

    model, tok = load_model(str(tiny_model_dir))
    w = model.model.layers[1].mlp.gate_proj.weight
    with torch.no_grad():
        w.add_(0.05 * torch.randn_like(w))
    ft_dir = tmp_path / "ft"
    model.save_pretrained(ft_dir, safe_serialization=True)
    tok.save_pretrained(ft_dir)
    out = tmp_path / "geo"
    args = _parser().parse_args(["analyze", "--model", str(tiny_model_dir), "--finetuned", str(ft_dir),
                                 "--k", "1,4", "--out", str(out), "--limit", "2"])
    assert args.func(args) == 0
    assert "mlp.gate_proj" in capsys.readouterr().out
    data = json.loads((out / "geometry.json").read_text())
    assert [(r["layer"], r["module"]) for r in data] == [(1, "mlp.gate_proj")]
    assert data[0]["rank"] > 4 and "random_energy_right_k4" in data[0]
    shift = json.loads((out / "shift.json").read_text())
    assert shift["benign"][0] == pytest.approx(0.0, abs=1e-6) and shift["benign"][1] > 0  # layer 0 untouched
    assert (out / "overlap_heatmap.png").exists() and (out / "shift.png").exists()


def test_cli_analyze_patch_no_shift(tiny_model_dir, tmp_path, capsys):
    patch = _saved_patch(tiny_model_dir, tmp_path / "patch", seed=3)
    out = tmp_path / "geo"
    args = _parser().parse_args(["analyze", "--model", str(tiny_model_dir), "--patch", str(patch),
                                 "--out", str(out), "--no-shift"])
    assert args.func(args) == 0
    assert (out / "geometry.json").exists() and not (out / "shift.json").exists()
    with pytest.raises(SystemExit):
        _parser().parse_args(["analyze", "--model", "m", "--patch", "p", "--finetuned", "f"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["analyze", "--model", "m", "--patch", "p", "--k", "a,b"])
