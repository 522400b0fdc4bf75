"""Issue 18, "progress you can see": every long step names its progress bar on stderr (anchor answers, A-init, the
prefix cache's build, the start-up speed check, dev checks, judging, geometry), and `progress=False` prints none."""

import pytest

from test_train import tiny_recipe

from safetypatch.jobs.train import train

TRAIN_BARS = ("anchor answers (base model", "A-init: harmful prompts", "A-init: benign prompts",
              "A-init: directions per module", "prefix cache (layers 0-0)", "speed check", "dev check")


def _recipe(tiny_model_dir, harmful_file, benign_file):
    """One epoch over layer 1 only (layer 0 is frozen: the prefix cache is built), two modules (a bar over them)."""
    return tiny_recipe(tiny_model_dir, harmful_file, benign_file, layers="1", epochs=1, init="lda",
                       target_modules=["up_proj", "down_proj"])


def test_a_tiny_training_names_every_long_step(tiny_model_dir, harmful_file, benign_file, tmp_path, capfd):
    res = train(_recipe(tiny_model_dir, harmful_file, benign_file), tmp_path / "run", progress=True)
    err = capfd.readouterr().err
    assert res.stats["speed_paths"]["frozen_prefix_cache"].startswith("layers 0-0 cached")
    missing = [name for name in TRAIN_BARS if name not in err]
    assert not missing, f"bars not shown: {missing}\n{err[-2000:]}"
    assert "4 harmful + 4 benign" in err  # the dev check bar counts both sides


def test_the_steps_print_nothing_with_progress_off(tiny_model_dir, harmful_file, benign_file, capfd):
    """Each step called as the trainer calls it, with progress=False: no bar, no line."""
    from safetypatch.modeling import load_model
    from safetypatch.training.config import TrainConfig
    from safetypatch.training.dev_checks import dev_prompts, refusal_rates
    from safetypatch.training.examples import build_examples
    from safetypatch.training.lora_init import contrast_init
    from safetypatch.training.speed import SpeedPaths
    from safetypatch.training.step import prepare_model

    cfg: TrainConfig = _recipe(tiny_model_dir, harmful_file, benign_file)
    model, tok = load_model(cfg.model)
    capfd.readouterr()
    build_examples(cfg, model, tok, progress=False)
    examples, _, sources = build_examples(cfg, model, tok, progress=False)  # the anchors from the cache
    model = prepare_model(cfg, model)
    contrast_init(model, tok, sources["refusal"], sources["anchor"], lda=True, progress=False)
    with SpeedPaths(model, cfg, examples, "cpu", False, tok.pad_token_id, progress=False) as sp:
        assert sp.prefix is not None and sp.prefix.active
        with sp.for_generation():
            refusal_rates(model, tok, *dev_prompts(cfg.dev_harmful, cfg.dev_benign, 4), 4, progress=False)
    assert capfd.readouterr().err == ""
    build_examples(cfg, model, tok)  # progress on: the cache hit is one short line
    assert capfd.readouterr().err == f"anchor answers: {len(sources['anchor'])} loaded from the cache\n"


def test_eval_and_geometry_bars(tiny_model_dir, tiny_patch, capfd):
    from safetypatch.config import GenerationConfig
    from safetypatch.data.readers import Record
    from safetypatch.evals.refusal import generate_and_judge
    from safetypatch.geometry import hidden_shift, lora_updates, update_records
    from safetypatch.modeling import load_model
    from safetypatch.patches import load_patch

    base, tok = load_model(str(tiny_model_dir))
    updates = lora_updates(tiny_patch)
    assert len(updates) == 2  # up_proj of both layers
    pm = load_patch(load_model(str(tiny_model_dir))[0], tiny_patch)
    records = [Record(prompt=f"Write a poem about {w}") for w in ("the sea", "bread", "Paris")]
    gen = GenerationConfig(max_new_tokens=3, batch_size=2)
    capfd.readouterr()
    for progress in (False, True):
        update_records(base, updates, ks=(1,), progress=progress)
        rows = generate_and_judge(pm, tok, records, ["base", "patched"], ("refusal_xstest",), gen,
                                  progress=progress)
        hidden_shift(pm, tok, [r.prompt for r in records], progress=progress, desc="shift: benign prompts")
        err = capfd.readouterr().err
        assert len(rows) == 6
        if not progress:
            assert err == ""
    for name in ("geometry: metrics per module", "generating (base)", "generating (patched)",
                 "judging (patched): refusal_xstest", "shift: benign prompts (base)", "shift: benign prompts (patched)"):
        assert name in err


def test_training_with_progress_off_prints_no_bar(tiny_model_dir, harmful_file, benign_file, tmp_path, capfd):
    train(_recipe(tiny_model_dir, harmful_file, benign_file), tmp_path / "run", progress=False)
    err = capfd.readouterr().err
    assert not [name for name in TRAIN_BARS if name in err]
