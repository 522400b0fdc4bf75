import json
import shutil

import pytest
import torch

from safetypatch.errors import SafetypatchError
from safetypatch.training.config import TrainConfig
from safetypatch.modeling import load_model
from safetypatch.patches import load_patch
from safetypatch.jobs.train import train


def tiny_recipe(model_dir, harmful_file, benign_file, **kw):
    base = dict(model=str(model_dir), data=str(harmful_file), benign=str(benign_file), rank=2, alpha=8.0,
                target_modules=["up_proj"], layers="all", lr=5e-3, epochs=2, batch_size=4, dev_size=4,
                dev_tokens=4, anchor_tokens=8, bf16="no", eval_every=0, recovery=0.0)  # step counts below assume it
    base.update(kw)
    return TrainConfig(**base)


def test_lora_training_writes_a_loadable_patch(tiny_model_dir, harmful_file, benign_file, tmp_path):
    res = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, recovery=1.0), tmp_path / "run", progress=False)
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    # 12 refusals + 12 recovery examples (recovery 1.0, the default) + 8 anchors = 32 / batch 4 = 8 steps, 2 epochs
    assert len(log) == res.stats["steps"] == 16
    refusal = [r["refusal"] for r in log if "refusal" in r]
    assert sum(refusal[-3:]) < sum(refusal[:3])  # refusal loss goes down
    assert any("anchor" in r for r in log) and {"lr", "tokens"} <= set(log[0])
    meta = json.loads((res.output_dir / "patch.json").read_text())
    assert meta["data"]["refusal"]["n"] == 12 and meta["data"]["anchors"]["n"] == 8
    assert meta["data"]["recovery"]["n"] == 12 and meta["data"]["recovery"]["source"] == "base"
    assert meta["recipe"]["rank"] == 2 and meta["shape"]["layers"] == [0, 1]
    assert len((tmp_path / "run" / "dev_log.jsonl").read_text().splitlines()) == 3  # base + one per epoch
    model, _ = load_model(str(tiny_model_dir))
    load_patch(model, res.output_dir)
    with pytest.raises(FileExistsError):
        train(tiny_recipe(tiny_model_dir, harmful_file, benign_file), tmp_path / "run", progress=False)


def test_kl_anchor_loss_and_speed_paths_agree(tiny_model_dir, harmful_file, benign_file, tmp_path):
    """Response-only logits and full logits give the same loss trajectory."""
    train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, benign_loss="kl", epochs=1, group_by_length=False),
              tmp_path / "a", progress=False)
    train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, benign_loss="kl", epochs=1, group_by_length=False,
                   response_only_logits=False), tmp_path / "b", progress=False)
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)
    assert la[0] > 0


def test_resume_after_interruption_matches_uninterrupted_run(tiny_model_dir, harmful_file, benign_file, tmp_path,
                                                             monkeypatch):
    from safetensors.torch import load_file

    import safetypatch.training.step as tr

    cfg = lambda: tiny_recipe(tiny_model_dir, harmful_file, benign_file, eval_every=3)  # noqa: E731
    ref = train(cfg(), tmp_path / "ref", progress=False)
    real, calls = tr.compute_loss, {"n": 0}

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "compute_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), tmp_path / "run", progress=False)
    monkeypatch.setattr(tr, "compute_loss", real)
    assert not (tmp_path / "run" / "patch").exists()
    with pytest.raises(Exception, match="already holds results"):
        train(cfg(), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different recipe"):
        train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, eval_every=3, lr=1e-2), tmp_path / "run",
              resume=True, progress=False)
    res = train(cfg(), tmp_path / "run", resume=True, progress=False)
    assert res.stats["steps"] == ref.stats["steps"] == 10
    a = load_file(ref.output_dir / "adapter_model.safetensors")
    b = load_file(res.output_dir / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_full_finetuning_and_mixing(tiny_model_dir, harmful_file, benign_file, tmp_path):
    mix = tmp_path / "mix.jsonl"
    mix.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"answer {i}"}) + "\n" for i in range(30)))
    res = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, method="full", layers="1", epochs=1,
                     mix=str(mix), mix_ratio=0.3), tmp_path / "full", progress=False)
    meta = json.loads((res.output_dir / "finetune.json").read_text())
    assert meta["data"]["mix"]["n"] == round(0.3 / 0.7 * 20)
    tuned, _ = load_model(str(res.output_dir))
    base, _ = load_model(str(tiny_model_dir))
    changed = {n for (n, p), (_, q) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(p, q)}
    assert changed and all(".layers.1." in n for n in changed)


def test_mixed_data_with_its_own_field_names(tiny_model_dir, harmful_file, benign_file, tmp_path):
    """mix_prompt_field / mix_response_field read general data laid out unlike the refusal data (AlpacaEval's
    instruction / output); without them the same file is a clear error naming the missing field."""
    mix = tmp_path / "alpaca.json"
    mix.write_text(json.dumps([{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(30)]))
    res = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, epochs=1, mix=str(mix), mix_ratio=0.3,
                            mix_prompt_field="instruction", mix_response_field="output"), tmp_path / "r",
                progress=False)
    assert json.loads((res.output_dir / "patch.json").read_text())["data"]["mix"]["n"] > 0
    with pytest.raises(SafetypatchError, match="prompt"):
        train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, epochs=1, mix=str(mix), mix_ratio=0.3),
              tmp_path / "r2", progress=False)


@pytest.mark.parametrize("init", ["contrast", "lda"])
def test_contrast_init_starts_as_a_no_op_and_sets_a_direction(tiny_model_dir, harmful_file, benign_file, tmp_path,
                                                             init):
    from safetypatch.training.lora_init import contrast_init
    from safetypatch.data import read_records
    from safetypatch.patches import attach_new_patch
    from safetypatch.config import PatchShape

    model, tok = load_model(str(tiny_model_dir))
    ids = tok(["Write a poem"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    peft_model = attach_new_patch(model, PatchShape(rank=2, target_modules=["up_proj"], layers="all"))
    a_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
    sep = contrast_init(peft_model, tok, read_records(harmful_file), read_records(benign_file), lda=init == "lda")
    assert len(sep) == 2 and all(v > 0 for v in sep.values())  # the direction separates the sets it came from
    for n, p in peft_model.named_parameters():
        if "lora_A" in n:
            assert not torch.equal(p[0], a_before[n][0])  # row 0 set
            torch.testing.assert_close(p[1], a_before[n][1])  # other rows keep PEFT's init
            torch.testing.assert_close(p[0].norm(), a_before[n][0].norm())  # same scale
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, before)  # B = 0: still the base model


def test_freeze_a_trains_b_only(tiny_model_dir, harmful_file, benign_file, tmp_path):
    from safetensors.torch import load_file

    res = train(tiny_recipe(tiny_model_dir, harmful_file, benign_file, init="lda", freeze_a=True, epochs=1),
                tmp_path / "r", progress=False)
    assert res.stats["trainable_parameters"] == 2 * 64 * 2  # B only: 2 layers x (64 out x rank 2)
    w = load_file(res.output_dir / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k)
    meta = json.loads((res.output_dir / "patch.json").read_text())
    assert meta["data"]["init"]["method"] == "lda"


def test_harmful_groups_split_whole_categories():
    from safetypatch.training.lora_init import harmful_groups
    from safetypatch.data import Record

    recs = [Record(prompt=f"p{i}", meta={"category": c}) for i, c in enumerate("aabbccd")]
    groups = harmful_groups(recs, 2)
    assert len(groups) == 2 and sum(map(len, groups)) == 7
    cats = [{r.meta["category"] for r in g} for g in groups]
    assert cats == [{"a", "c"}, {"b", "d"}]
    assert harmful_groups(recs, 1) == [recs]


def test_response_positions_count_from_the_first_answer_token():
    from safetypatch.training.loss import response_positions

    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    # targets are labels[:, 1:]: row 0 has answer tokens 5, 6, 7; row 1 has 8, 9
    assert response_positions({"labels": labels}).tolist() == [0, 1, 2, 0, 1]


def test_dev_score_penalises_over_refusal_beyond_tolerance():
    from safetypatch.training.dev_checks import dev_score

    rates = {"harmful_refusal": 0.9, "benign_refusal": 0.10}
    assert dev_score(rates, base_benign=0.08, penalty=3.0, tolerance=0.02) == pytest.approx(0.9)  # within tolerance
    assert dev_score(rates, base_benign=0.0, penalty=3.0, tolerance=0.02) == pytest.approx(0.9 - 3.0 * 0.08)
    assert dev_score(rates, base_benign=0.0, penalty=10.0, tolerance=0.0) == pytest.approx(0.9 - 1.0)


def test_dev_score_defaults_are_the_recipes():
    """Called without penalty / tolerance, dev_score scores as a default TrainConfig does (10.0 / 0.0; the old
    defaults, 3.0 / 0.02, disagreed with the recipe's)."""
    from safetypatch.training.dev_checks import dev_score

    cfg = TrainConfig()
    rates = {"harmful_refusal": 0.9, "benign_refusal": 0.10}
    for base in (0.0, 0.05, 0.09):
        assert dev_score(rates, base) == dev_score(rates, base, cfg.dev_penalty, cfg.dev_tolerance)
    assert dev_score(rates, base_benign=0.0) == pytest.approx(0.9 - 10.0 * 0.10)


def test_resume_of_a_run_checkpointed_at_its_last_step_writes_the_patch(tiny_model_dir, harmful_file, benign_file,
                                                                        tmp_path):
    """A run whose checkpoint was taken at its final step (killed before the patch was written) resumes into the
    patch without running a step (the old loop read the last step's record, which only a step sets)."""
    from safetensors.torch import load_file

    cfg = lambda: tiny_recipe(tiny_model_dir, harmful_file, benign_file, epochs=1)  # noqa: E731
    first = train(cfg(), tmp_path / "run", progress=False)
    weights = load_file(first.output_dir / "adapter_model.safetensors")
    shutil.rmtree(first.output_dir)
    (tmp_path / "run" / "train_stats.json").unlink()
    res = train(cfg(), tmp_path / "run", resume=True, progress=False)
    assert res.stats["steps"] == first.stats["steps"] == 5
    assert res.stats["final_loss"] == first.stats["final_loss"]
    assert res.stats["best_dev"] == first.stats["best_dev"]
    again = load_file(res.output_dir / "adapter_model.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert json.loads((res.output_dir / "patch.json").read_text())["training"]["steps"] == 5
