import json

import numpy as np
import pytest
import torch

from support import build_tiny_model
from safetypatch.errors import PatchError
from safetypatch.patches import delta_weights, export_gguf, export_peft, load_patch, lora_deltas
from test_patch_ops import ALL_MODULES, logits, make_patch, patched_logits, run_cli

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
N_HEAD, N_HEAD_KV = 4, 2  # conftest's tiny Llama


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (rows of q / k), written out independently of the code under test."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing GGUF key {key}"
    return f.contents()


# ---------------------------------------------------------------------------------------------- PEFT / vLLM
def test_export_peft_is_clean_and_equivalent(tiny_tok, tmp_path):
    from peft import PeftModel

    p = make_patch(tiny_tok, tmp_path / "p", rank=2, modules=("up_proj", "q_proj"))
    assert export_peft(p, tmp_path / "v") == []
    assert {f.name for f in (tmp_path / "v").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["peft_type"] == "LORA" and (cfg["r"], cfg["lora_alpha"]) == (2, 4.0)
    got = logits(PeftModel.from_pretrained(build_tiny_model(tiny_tok), str(tmp_path / "v")), tiny_tok)
    torch.testing.assert_close(got, patched_logits(tiny_tok, p))
    warnings = export_peft(p, tmp_path / "v1", max_lora_rank=1)
    assert len(warnings) == 1 and "vLLM needs --max-lora-rank >= 2" in warnings[0] and "use --max-lora-rank 8" in warnings[0]


def test_export_peft_folds_per_module_scales(tiny_tok, tmp_path):
    from peft import PeftModel

    p = make_patch(tiny_tok, tmp_path / "p", rank=2, alpha=4.0, rank_pattern={"up_proj": 3}, alpha_pattern={"q_proj": 8.0})
    export_peft(p, tmp_path / "v")
    got_logits = logits(PeftModel.from_pretrained(build_tiny_model(tiny_tok), str(tmp_path / "v")), tiny_tok)
    torch.testing.assert_close(got_logits, patched_logits(tiny_tok, p), rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["r"] == 3
    want, got = delta_weights(p), delta_weights(tmp_path / "v")
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m])


def test_export_peft_cli_prints_warning(tiny_tok, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p", rank=20)
    argv = ["patch", "export", str(p), "--format", "peft", "-o", str(tmp_path / "v")]
    assert run_cli(argv) == 0
    assert "warning: rank 20 > 16: vLLM needs --max-lora-rank >= 20 (use --max-lora-rank 32)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- GGUF / llama.cpp
def test_export_gguf_read_back(tiny_tok, tmp_path):
    from gguf import GGUFReader

    p = make_patch(tiny_tok, tmp_path / "p", rank=2, alpha=4.0, modules=ALL_MODULES, layers="all")
    out = tmp_path / "patch.gguf"
    export_gguf(p, out, n_head=N_HEAD, n_head_kv=N_HEAD_KV)
    r = GGUFReader(str(out))
    assert field(r, "general.type") == "adapter"
    assert field(r, "adapter.type") == "lora"
    assert field(r, "general.architecture") == "llama"
    assert field(r, "adapter.lora.alpha") == pytest.approx(4.0)
    tensors = {t.name: t for t in r.tensors}
    deltas = lora_deltas(p)
    want_names = set()
    for module, (a, b, scale) in deltas.items():
        layer, leaf = int(module.split(".")[2]), module.split(".")[-1]
        name = f"blk.{layer}.{GGUF_NAMES[leaf]}.weight"
        want_names |= {name + ".lora_a", name + ".lora_b"}
        ta, tb = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert list(ta.shape) == [a.shape[1], a.shape[0]] and list(tb.shape) == [b.shape[1], b.shape[0]]  # ggml order
        want_b = b.numpy()
        if leaf in ("q_proj", "k_proj"):
            want_b = llama_cpp_permute(want_b, N_HEAD if leaf == "q_proj" else N_HEAD_KV)
            assert not np.allclose(want_b, b.numpy())  # the permutation is not a no-op on these shapes
        np.testing.assert_allclose(np.asarray(ta.data), a.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(tb.data), want_b, rtol=1e-6)
        assert scale == pytest.approx(4.0 / a.shape[0])  # llama.cpp's alpha / rank gives the PEFT scale back
    assert set(tensors) == want_names and len(tensors) == 2 * len(deltas) == 28
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]
    with pytest.raises(FileExistsError):
        export_gguf(p, out, n_head=N_HEAD)


def test_export_gguf_folds_per_module_scales(tiny_tok, tmp_path):
    from gguf import GGUFReader

    p = make_patch(tiny_tok, tmp_path / "p", rank=2, alpha=4.0, modules=("up_proj", "v_proj"),
                   rank_pattern={"up_proj": 3}, alpha_pattern={"v_proj": 8.0})
    export_gguf(p, tmp_path / "p.gguf")  # no q / k: no head counts needed
    r = GGUFReader(str(tmp_path / "p.gguf"))
    alpha = float(field(r, "adapter.lora.alpha"))
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    for module, dw in delta_weights(p).items():
        name = f"blk.1.{GGUF_NAMES[module.split('.')[-1]]}.weight"
        a, b = t[name + ".lora_a"], t[name + ".lora_b"]
        np.testing.assert_allclose(alpha / a.shape[0] * b @ a, dw.numpy(), rtol=1e-5, atol=1e-6)


def test_export_gguf_head_counts(tiny_tok, tiny_model_dir, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p", modules=("q_proj", "k_proj"))
    with pytest.raises(PatchError, match="head counts"):  # patch.json's base spec 'tiny' cannot be resolved
        export_gguf(p, tmp_path / "x.gguf")
    with pytest.raises(PatchError, match="unknown llama.cpp architecture"):
        export_gguf(p, tmp_path / "x.gguf", arch="no-such-arch", n_head=4)
    export_gguf(p, tmp_path / "a.gguf", n_head=N_HEAD, n_head_kv=N_HEAD_KV)
    argv = ["patch", "export", str(p), "--format", "gguf", "--model", str(tiny_model_dir), "-o", str(tmp_path / "b.gguf")]
    assert run_cli(argv) == 0  # head counts read from the model's config.json
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # a llama base exported as another llama.cpp architecture would be a silently wrong layout: refused, named
    assert run_cli(argv[:-1] + [str(tmp_path / "c.gguf"), "--arch", "qwen2"]) == 2
    assert "model_type 'llama'" in capsys.readouterr().err and not (tmp_path / "c.gguf").exists()
    assert load_patch(build_tiny_model(tiny_tok), p) is not None  # the source patch is untouched


def test_head_counts_from_gguf_base(tmp_path):
    import gguf

    from safetypatch.patches.export import head_counts

    w = gguf.GGUFWriter(str(tmp_path / "base.gguf"), "llama")
    w.add_head_count(6)
    w.add_head_count_kv(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert head_counts(str(tmp_path / "base.gguf")) == (6, 3)
