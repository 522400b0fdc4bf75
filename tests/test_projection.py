import pytest
import torch

from support import build_tiny_model
from safetypatch.config import PatchShape
from safetypatch.patches import (attach_new_patch, delta_weights, load_patch, project_patch, project_update, save_patch,
                                 verify_files)


@pytest.fixture()
def patch_dir(tiny_tok, tmp_path):
    model = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=2, alpha=4.0,
                                                                     target_modules=["up_proj", "q_proj"], layers="all"))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 1.0)
    save_patch(model, tmp_path / "p", {"base_model": {"spec": "tiny"}, "shape": {"rank": 2}})
    return tmp_path / "p"


@pytest.mark.parametrize("side", ["column", "row", "both"])
def test_projected_patch_has_no_energy_in_top_k_and_equals_dense_projection(tiny_tok, patch_dir, tmp_path, side):
    base = build_tiny_model(tiny_tok)
    meta = project_patch(patch_dir, base, k=3, out_dir=tmp_path / f"proj-{side}", side=side)
    verify_files(tmp_path / f"proj-{side}")
    before, after = delta_weights(patch_dir), delta_weights(tmp_path / f"proj-{side}")
    weights = dict(base.named_parameters())
    for module, dw in before.items():
        u, _, vh = torch.linalg.svd(weights[f"{module}.weight"].detach().double(), full_matrices=False)
        uk, vk = u[:, :3], vh[:3].T
        want = project_update(dw.double(), uk, vk, side)
        torch.testing.assert_close(after[module].double(), want, rtol=1e-4, atol=1e-5)
        if side in ("column", "both"):
            assert (uk.T @ after[module].double()).abs().max() < 1e-5
        if side in ("row", "both"):
            assert (after[module].double() @ vk).abs().max() < 1e-5
    assert 0 < meta["derived_from"]["retained_energy"] < 1
    assert meta["shape"]["rank"] == 2


def test_projected_patch_loads_in_plain_peft(tiny_tok, patch_dir, tmp_path):
    from peft import PeftModel

    project_patch(patch_dir, build_tiny_model(tiny_tok), k=2, out_dir=tmp_path / "proj")
    PeftModel.from_pretrained(build_tiny_model(tiny_tok), str(tmp_path / "proj"))
    load_patch(build_tiny_model(tiny_tok), tmp_path / "proj")  # and passes safetypatch's checks


def test_planted_update_inside_top_k_is_removed(tiny_tok, tmp_path):
    base = build_tiny_model(tiny_tok)
    model = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=1, alpha=1.0, target_modules=["up_proj"],
                                                                     layers="0"))
    name = "model.layers.0.mlp.up_proj"
    u, _, vh = torch.linalg.svd(dict(base.named_parameters())[f"{name}.weight"].detach(), full_matrices=False)
    mod = dict(model.named_modules())["base_model.model." + name]
    with torch.no_grad():  # dW = u1 v1^T: entirely inside the top-1 subspace on both sides
        mod.lora_A["default"].weight.copy_(vh[:1])
        mod.lora_B["default"].weight.copy_(u[:, :1])
    save_patch(model, tmp_path / "planted", {"base_model": {"spec": "tiny"}})
    meta = project_patch(tmp_path / "planted", base, k=1, out_dir=tmp_path / "out")
    assert meta["derived_from"]["retained_energy"] < 1e-8


def test_projected_patch_keeps_the_source_storage_dtype(tiny_tok, tmp_path):
    from safetensors.torch import load_file

    model = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=2, alpha=4.0, target_modules=["up_proj"],
                                                                     layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    save_patch(model, tmp_path / "p16", {"base_model": {"spec": "tiny"}, "shape": {"rank": 2}}, save_dtype="float16")
    project_patch(tmp_path / "p16", build_tiny_model(tiny_tok), k=2, out_dir=tmp_path / "proj")
    src = load_file(str(tmp_path / "p16" / "adapter_model.safetensors"))
    out = load_file(str(tmp_path / "proj" / "adapter_model.safetensors"))
    assert {t.dtype for t in src.values()} == {t.dtype for t in out.values()} == {torch.float16}
    assert (tmp_path / "proj" / "adapter_model.safetensors").stat().st_size == \
        (tmp_path / "p16" / "adapter_model.safetensors").stat().st_size


def test_projection_of_a_conv1d_patch_uses_the_weight_as_out_x_in(tiny_tok, tmp_path):
    """GPT-2's Conv1D stores W0 as in x out while dW = B @ A is out x in (PEFT's fan_in_fan_out): the protected
    subspaces are those of W0^T, and the projected patch still loads."""
    from archs import build_arch

    model = attach_new_patch(build_arch("gpt2", tiny_tok), PatchShape(rank=2, alpha=4.0, target_modules=["c_fc"],
                                                                      layers="all"))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 1.0)
    save_patch(model, tmp_path / "p", {"base_model": {"spec": "tiny-gpt2"}, "shape": {"rank": 2}})
    base = build_arch("gpt2", tiny_tok)
    project_patch(tmp_path / "p", base, k=3, out_dir=tmp_path / "proj", side="both")
    before = delta_weights(tmp_path / "p", fan_in_fan_out_ok=True)
    after = delta_weights(tmp_path / "proj", fan_in_fan_out_ok=True)
    weights = dict(base.named_parameters())
    assert before and all(m.endswith("mlp.c_fc") for m in before)
    for module, dw in before.items():
        w0 = weights[f"{module}.weight"].detach().double().T  # out x in, like dW
        assert w0.shape == dw.shape and w0.shape[0] != w0.shape[1]
        u, _, vh = torch.linalg.svd(w0, full_matrices=False)
        uk, vk = u[:, :3], vh[:3].T
        torch.testing.assert_close(after[module].double(), project_update(dw.double(), uk, vk, "both"),
                                   rtol=1e-4, atol=1e-5)
        assert (uk.T @ after[module].double()).abs().max() < 1e-5
    load_patch(build_arch("gpt2", tiny_tok), tmp_path / "proj")
