"""Non-finite patches are never written and never loaded (issue 16): every patch operation checks its result is
finite and within its storage dtype's range before writing (PatchError naming the operation and the cause), the
flags are checked, and a patch whose stored weights are NaN or infinite is refused by every loader."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from safetypatch.cli import main
from safetypatch.config import PatchShape
from safetypatch.errors import PatchError
from safetypatch.io_utils import sha256_file
from safetypatch.modeling.loading import load_model
from safetypatch.patches import (attach_new_patch, export_gguf, load_patch, patch_info, read_adapter, save_patch,
                                 scale_patch, stack_patches, verify_files)


def _model(model_dir, b_std: float = 1.0):
    model, _ = load_model(str(model_dir))
    model = attach_new_patch(model, PatchShape(rank=2, alpha=8.0, target_modules=["up_proj"], layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_std)
    return model


def make_patch(model_dir, out, dtype: str = "float16", b_std: float = 1.0):
    save_patch(_model(model_dir, b_std), out, {"base_model": {"spec": str(model_dir)}}, save_dtype=dtype)
    return out


def poison(patch, value: float = float("nan")):
    """A patch with a non-finite weight whose patch.json records the matching sha256 (what the old `patch scale
    --factor nan` wrote: the sha256 check passed)."""
    weights = patch / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    meta = json.loads((patch / "patch.json").read_text())
    meta["weights"]["sha256"] = sha256_file(weights)
    (patch / "patch.json").write_text(json.dumps(meta))
    return patch


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -float("inf")])
def test_scale_by_a_non_finite_factor_is_refused(tiny_patch, tmp_path, factor):
    with pytest.raises(PatchError, match="scale: factor .* not finite"):
        scale_patch(tiny_patch, factor, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("factor", ["nan", "inf", "-inf"])
def test_cli_scale_refuses_a_non_finite_factor(tiny_patch, tmp_path, factor, capsys):
    try:
        rc = main(["patch", "scale", str(tiny_patch), f"--factor={factor}", "-o", str(tmp_path / "s")])
    except SystemExit as e:  # refused by argparse
        rc = e.code
    assert rc == 2 and not (tmp_path / "s").exists()
    assert "factor" in capsys.readouterr().err


def test_scale_overflowing_float16_is_refused(tiny_model_dir, tmp_path, capsys):
    p = make_patch(tiny_model_dir, tmp_path / "p16", "float16")
    with pytest.raises(PatchError, match=r"scale: .*lora_B.* beyond the range of float16.*factor 1e\+10"):
        scale_patch(p, 1e10, tmp_path / "s")
    assert main(["patch", "scale", str(p), "--factor", "1e10", "-o", str(tmp_path / "s")]) == 2
    assert "float16" in capsys.readouterr().err and not (tmp_path / "s").exists()
    scale_patch(p, 100.0, tmp_path / "ok")  # within range: written, finite
    assert verify_files(tmp_path / "ok")


def test_stack_with_a_non_finite_weight_is_refused(tiny_patch, tmp_path, capsys):
    with pytest.raises(PatchError, match="stack: weight 1 nan is not finite"):
        stack_patches([tiny_patch, tiny_patch], [math.nan, 1.0], tmp_path / "s")
    assert main(["patch", "stack", str(tiny_patch), str(tiny_patch), "--weights", "nan,1",
                 "-o", str(tmp_path / "s")]) == 2
    assert "--weights" in capsys.readouterr().err
    with pytest.raises(PatchError, match="stack: the result is not finite.*caused by the weights 1e\\+39"):
        stack_patches([tiny_patch, tiny_patch], [1e39, 1.0], tmp_path / "s")  # overflows float32
    assert not (tmp_path / "s").exists()


def test_a_patch_with_non_finite_weights_is_never_loaded(tiny_model_dir, tiny_patch, tmp_path, capsys):
    for value in (float("nan"), float("inf")):
        p = poison(tiny_patch, value)
        for load in (verify_files, read_adapter, patch_info):
            with pytest.raises(PatchError, match="NaN or infinite"):
                load(p)
        model, _ = load_model(str(tiny_model_dir))
        for verify in (True, False):
            with pytest.raises(PatchError, match="NaN or infinite"):
                load_patch(model, p, verify=verify)
        assert main(["patch", "info", str(p)]) == 2
        assert main(["patch", "scale", str(p), "--factor", "1", "-o", str(tmp_path / f"s{value}")]) == 2
    assert capsys.readouterr().err.count("NaN or infinite") == 4


def test_save_refuses_weights_that_are_not_finite(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).view(-1)[0] = float("nan")
    with pytest.raises(PatchError, match="save: .*NaN.*training diverged"):
        save_patch(model, tmp_path / "p", {})
    model = _model(tiny_model_dir)
    model.peft_config["default"].lora_alpha = float("nan")  # what `train --alpha nan` saved
    with pytest.raises(PatchError, match="lora_alpha"):
        save_patch(model, tmp_path / "p", {})
    with pytest.raises(PatchError, match="save: .* beyond the range of float16"):
        save_patch(_model(tiny_model_dir, b_std=1e6), tmp_path / "p", {}, save_dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_gguf_export_refuses_float16_overflow(tiny_model_dir, tmp_path):
    p = make_patch(tiny_model_dir, tmp_path / "p32", "float32", b_std=1e6)
    with pytest.raises(PatchError, match="beyond the range of float16"):
        export_gguf(p, tmp_path / "p.gguf", n_head=4, n_head_kv=2, dtype="float16")
    assert not (tmp_path / "p.gguf").exists()
    export_gguf(p, tmp_path / "p.gguf", n_head=4, n_head_kv=2, dtype="float32")
