import json

import pytest
import torch

from support import build_tiny_model
from safetypatch.jobs.calibrate import CalibrationConfig, calibrate, choose_factor, set_scale
from safetypatch.config import GenerationConfig, PatchShape
from safetypatch.modeling import generate
from safetypatch.patches import attach_new_patch, load_patch, save_patch, verify_files


def test_choose_factor_strongest_within_budget():
    curve = [{"factor": 0.0, "harmful_refusal": 0.1, "benign_refusal": 0.02},
             {"factor": 0.5, "harmful_refusal": 0.6, "benign_refusal": 0.03},
             {"factor": 1.0, "harmful_refusal": 0.9, "benign_refusal": 0.06},
             {"factor": 1.5, "harmful_refusal": 0.9, "benign_refusal": 0.07},
             {"factor": 2.0, "harmful_refusal": 1.0, "benign_refusal": 0.30}]
    assert choose_factor(curve, 0.05)["factor"] == 1.0  # 1.5 ties on harmful: the smaller wins; 2.0 is over budget
    assert choose_factor(curve, 0.01)["factor"] == 0.5
    none = choose_factor(curve[:1] + curve[-1:], 0.05)
    assert none["factor"] == 0.0 and not none["within_budget"]


@pytest.fixture()
def patch_and_prompts(tiny_tok, tmp_path):
    model = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=2, alpha=4.0, target_modules=["up_proj"],
                                                                     layers="all"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 2.0)
    save_patch(model, tmp_path / "patch", {"base_model": {"spec": "tiny"}})
    for name in ("h", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{name} prompt number {i}"}) + "\n"
                                                        for i in range(4)))
    return tmp_path


def test_calibrate_records_curve_and_keeps_weights(tiny_tok, patch_and_prompts):
    d = patch_and_prompts
    cfg = CalibrationConfig(factors=(0.5, 1.0), dev_harmful=str(d / "h.jsonl"), dev_benign=str(d / "b.jsonl"),
                            max_new_tokens=4, batch_size=4)
    rec = calibrate(d / "patch", cfg=cfg, out_dir=d / "cal", progress=False,
                    model_and_tok=(build_tiny_model(tiny_tok), tiny_tok))
    assert [p["factor"] for p in rec["curve"]] == [0.0, 0.5, 1.0]
    meta = verify_files(d / "patch")  # the sha256 of the weights still matches
    assert meta["calibration"]["curve"] == rec["curve"] and meta["calibration"]["budget"] == 0.05
    assert (d / "cal" / "calibration.json").exists() and (d / "cal" / "calibration.png").stat().st_size > 0


def test_scale_zero_is_the_base_model_and_scale_is_restored(tiny_tok, patch_and_prompts):
    from peft.tuners.lora import LoraLayer

    base = build_tiny_model(tiny_tok)
    prompts = ["hello there", "how do I bake bread"]
    gen = GenerationConfig(max_new_tokens=6, batch_size=2)
    want = [g.token_ids for g in generate(base, tiny_tok, prompts, gen, progress=False)]
    model = load_patch(build_tiny_model(tiny_tok), patch_and_prompts / "patch")
    scaling = {n: dict(m.scaling) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    full = [g.token_ids for g in generate(model, tiny_tok, prompts, gen, progress=False)]
    set_scale(model, 0.0, scaling)
    assert [g.token_ids for g in generate(model, tiny_tok, prompts, gen, progress=False)] == want
    assert full != want  # the patch does change the outputs at scale 1
    set_scale(model, 1.0, scaling)
    assert [g.token_ids for g in generate(model, tiny_tok, prompts, gen, progress=False)] == full


def test_cli_refuses_bad_factors(capsys):
    from safetypatch.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "--patch", "x", "--factors", "a,b"])
    assert "--factors" in capsys.readouterr().err


def test_sweep_at_zero_generates_exactly_what_the_base_model_does(tiny_tok, patch_and_prompts, monkeypatch):
    import safetypatch.training.dev_checks
    from safetypatch.jobs.calibrate import dev_prompts, sweep
    from safetypatch.training.config import TrainConfig, use_bf16
    from safetypatch.training.dev_checks import refusal_rates

    judged: list[str] = []
    monkeypatch.setattr(safetypatch.training.dev_checks, "keyword_refusal", lambda text: judged.append(text) or False)
    d = patch_and_prompts
    cfg = CalibrationConfig(factors=(1.0,), dev_harmful=str(d / "h.jsonl"), dev_benign=str(d / "b.jsonl"),
                            max_new_tokens=5, batch_size=3)
    harmful, benign = dev_prompts(cfg)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=use_bf16(TrainConfig().bf16, "cpu")):
        refusal_rates(build_tiny_model(tiny_tok), tiny_tok, harmful, benign, 5, batch_size=3)
    base_texts, judged[:] = list(judged), []
    curve = sweep(load_patch(build_tiny_model(tiny_tok), d / "patch"), tiny_tok, cfg, progress=False)
    assert [p["factor"] for p in curve] == [0.0, 1.0] and len(judged) == 2 * len(base_texts) == 16
    assert judged[:8] == base_texts  # s = 0: the base model's answers, token for token
    assert judged[8:] != base_texts  # s = 1: the patch changes them
