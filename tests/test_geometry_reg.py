import pytest
import torch

from support import build_tiny_model
from safetypatch.config import PatchShape
from safetypatch.training.config import TrainConfig
from safetypatch.training.regularizer import OverlapPenalty
from safetypatch.patches import attach_new_patch
from test_train import tiny_recipe


def _patched(tok, seed=0):
    model = attach_new_patch(build_tiny_model(tok), PatchShape(rank=2, alpha=4.0, target_modules=["up_proj", "o_proj"],
                                                               layers="all"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("side", ["column", "row", "both"])
@pytest.mark.parametrize("variant", ["uniform", "normalized"])
def test_penalty_equals_dense_computation(tiny_tok, side, variant):
    from peft.tuners.lora import LoraLayer

    model = _patched(tiny_tok)
    got = OverlapPenalty(model, k=3, side=side, variant=variant)()
    want = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        w0 = mod.get_base_layer().weight.detach().double()
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        w = torch.ones(3, dtype=torch.float64) if variant == "uniform" else s[:3] / s[0]
        dw = mod.scaling["default"] * (mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double())
        if side in ("column", "both"):
            want += float((torch.diag(w) @ u[:, :3].T @ dw).pow(2).sum())
        if side in ("row", "both"):
            want += float((dw @ vh[:3].T @ torch.diag(w)).pow(2).sum())
    assert float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("target", ["mlp.up", "attn.o"])
def test_penalty_of_a_conv1d_patch_uses_the_weight_as_out_x_in(tiny_tok, target):
    """GPT-2's Conv1D stores W0 as in x out (PEFT's fan_in_fan_out): the penalty uses the subspaces of W0^T, for a
    non-square weight (c_fc: no shape error) and a square one (attn c_proj: no silently swapped U and V)."""
    from archs import build_arch
    from peft.tuners.lora import LoraLayer

    model = attach_new_patch(build_arch("gpt2", tiny_tok), PatchShape(rank=2, alpha=4.0, target_modules=[target],
                                                                      layers="all"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 1.0)
    want, n_mods = 0.0, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        n_mods += 1
        w0 = mod.get_base_layer().weight.detach().double().T  # out x in
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        dw = mod.scaling["default"] * (mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double())
        w = s[:3] / s[0]
        want += float((torch.diag(w) @ u[:, :3].T @ dw).pow(2).sum() + (dw @ vh[:3].T @ torch.diag(w)).pow(2).sum())
    assert n_mods == 2
    assert float(OverlapPenalty(model, k=3, side="both")()) == pytest.approx(want, rel=1e-4)


def test_planted_inside_is_large_and_orthogonal_is_zero(tiny_tok):
    model = _patched(tiny_tok)
    from peft.tuners.lora import LoraLayer

    mods = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for m in mods:  # dW = u_1 v_1^T, fully inside the top-1 subspace on both sides
            u, _, vh = torch.linalg.svd(m.get_base_layer().weight.detach(), full_matrices=False)
            m.lora_A["default"].weight.zero_()
            m.lora_B["default"].weight.zero_()
            m.lora_A["default"].weight[0].copy_(vh[0])
            m.lora_B["default"].weight[:, 0].copy_(u[:, 0])
    inside = float(OverlapPenalty(model, k=1, variant="uniform")())
    with torch.no_grad():
        for m in mods:  # now dW = u_last v_last^T: orthogonal to the top-4
            u, _, vh = torch.linalg.svd(m.get_base_layer().weight.detach(), full_matrices=False)
            m.lora_A["default"].weight[0].copy_(vh[-1])
            m.lora_B["default"].weight[:, 0].copy_(u[:, -1])
    outside = float(OverlapPenalty(model, k=4, variant="uniform")())
    assert inside > 1.0 and outside < 1e-8


def test_training_with_the_regularizer_lowers_the_overlap(tiny_model_dir, harmful_file, benign_file, tmp_path):
    from safetypatch.geometry import lora_updates
    from safetypatch.modeling import load_model
    from safetypatch.jobs.train import train

    def overlap(patch):
        base, _ = load_model(str(tiny_model_dir))
        total = 0.0
        for (layer, module), dw in lora_updates(patch).items():
            w0 = dict(base.named_parameters())[f"model.layers.{layer}.{module}.weight"].detach().double()
            u, _, _ = torch.linalg.svd(w0, full_matrices=False)
            total += float((u[:, :4].T @ dw).pow(2).sum() / dw.pow(2).sum())
        return total

    common = dict(init="default", freeze_a=False, epochs=3, overlap_k=4, overlap_side="column")
    plain = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, **common), tmp_path / "plain", progress=False)
    reg = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, overlap_beta=50.0, **common), tmp_path / "reg",
                progress=False)
    assert overlap(reg.output_dir) < 0.5 * overlap(plain.output_dir)
    log = (tmp_path / "reg" / "train_log.jsonl").read_text()
    assert '"overlap"' in log


def test_config_validation():
    from safetypatch.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap_side"):
        TrainConfig(overlap_side="diagonal").validate()
    with pytest.raises(ConfigError, match="lora"):
        TrainConfig(method="full", overlap_beta=1.0).validate()


def test_row_penalty_with_a_frozen_a_warns(tiny_model_dir, harmful_file, benign_file, tmp_path, capsys):
    from safetypatch.jobs.train import train

    common = dict(init="default", freeze_a=True, epochs=0.25, overlap_beta=1.0, overlap_k=2)
    train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, overlap_side="both", **common), tmp_path / "both",
          progress=False)
    assert "frozen A" in capsys.readouterr().err
    train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, overlap_side="column", **common), tmp_path / "column",
          progress=False)
    assert "frozen A" not in capsys.readouterr().err
