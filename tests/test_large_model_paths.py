"""Large-model paths of the trainer: gradient checkpointing (same patch), a bfloat16 base (float32 LoRA weights),
and QLoRA's 4-bit loading (CUDA only: here, its one-line error)."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_recipe

from safetypatch.cli import main
from safetypatch.errors import ConfigError
from safetypatch.jobs.train import train
from safetypatch.modeling import decoder_layers
from safetypatch.training.config import TrainConfig


def checkpointing_layers(model) -> int:
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in decoder_layers(model))


def test_gradient_checkpointing_gives_the_same_patch(tiny_model_dir, harmful_file, benign_file, tmp_path):
    kw = dict(layers="1", init="default", freeze_a=False, save_dtype="float32")
    plain = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, **kw), tmp_path / "a", progress=False)
    ckpt = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, gradient_checkpointing=True, **kw),
                 tmp_path / "b", progress=False)
    assert checkpointing_layers(plain.model) == 0 and checkpointing_layers(ckpt.model) == 2
    a, b = (dict(r.model.named_parameters()) for r in (plain, ckpt))
    lora = [n for n in a if "lora_B" in n]
    assert lora and all(a[n].abs().max() > 1e-4 for n in lora)
    for n in lora:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


def test_bfloat16_base_trains_float32_lora(tiny_model_dir, harmful_file, benign_file, tmp_path):
    res = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, model_dtype="bfloat16"), tmp_path / "r",
                progress=False)
    params = dict(res.model.named_parameters())
    assert params["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"].dtype == torch.bfloat16
    lora = [p for n, p in params.items() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert res.stats["final_loss"] is not None and (res.output_dir / "adapter_model.safetensors").is_file()


def test_four_bit_needs_a_gpu_and_a_patch(tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: 4-bit loading would run")
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"), "--load-in-4bit", "true",
                 "--init", "default", "--benign", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: load_in_4bit (QLoRA) needs a CUDA GPU") and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="'load_in_4bit' \\(QLoRA\\) trains a LoRA patch"):
        TrainConfig(method="full", load_in_4bit=True).validate()
    with pytest.raises(ConfigError, match="field 'model_dtype' must be one of"):
        TrainConfig(model_dtype="int8").validate()


def test_paper_b_example_recipe_and_suite_load():
    """examples/paper_b: the recipe is a valid TrainConfig in paper B's setting, the suite a valid suite."""
    from pathlib import Path

    from safetypatch.cli.flags import load_yaml
    from safetypatch.evals.suite import load_suite

    root = Path(__file__).resolve().parent.parent / "examples" / "paper_b"
    cfg = load_yaml(TrainConfig, str(root / "recipe.yaml"), {})
    cfg.validate()
    assert (cfg.model, cfg.rank, list(cfg.target_modules), cfg.layers) == (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, ["mlp.up"], "middle")
    assert cfg.benign in (None, "none") and cfg.model_dtype == "bfloat16" and cfg.gradient_checkpointing
    suite = load_suite(str(root / "suite.yaml"))
    assert {"strongreject", "gsm8k", "xstest_safe"} <= {e.name for e in suite.entries}
