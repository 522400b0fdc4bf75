"""A typo never blocks the run directory, and a resume is robust (issue 16).

`train` claims its run directory (and writes train_config.json) only after the recipe validated, fits the model
(layers in range, target modules present) and its data was read: a failed start leaves nothing, and the corrected
command runs. `--resume` with other flags, a damaged checkpoint or a damaged train_config.json is one clear error
naming the file and the way on; after a resume train_log.jsonl does not repeat steps."""

from __future__ import annotations

import json
import shutil

import pytest

from safetypatch.cli import main
from safetypatch.config import from_dict
from safetypatch.jobs.train import train
from safetypatch.training.config import TrainConfig


def recipe(model_dir, harmful_file, benign_file, **kw):
    """A fast recipe for the tiny model as flag values (the CLI's) and as field values (the API's)."""
    base = dict(model=str(model_dir), data=str(harmful_file), benign=str(benign_file), rank=2, alpha=8.0,
                target_modules="up_proj", layers="all", lr=5e-3, epochs=2, batch_size=4, dev_size=4, dev_tokens=4,
                anchor_tokens=8, bf16="no", eval_every=3, dev_harmful=str(harmful_file), dev_benign=str(benign_file),
                recovery=0.0)  # the tests count steps and checkpoints without recovery examples
    base.update(kw)
    return base


def argv(out, fields, *extra):
    return ["train", "--out", str(out), *(x for k, v in fields.items() for x in (f"--{k.replace('_', '-')}", str(v))),
            *extra]


def run(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("typo,needle", [
    ({"layers": "5"}, "out of range for a model with 2 layers"),
    ({"layers": "1-0"}, "goes backwards"),
    ({"target_modules": "up_prj"}, "--target-modules"),
    ({"target_modules": "self_attn"}, "is no role and no linear module"),  # (`mlp` is a role group now)
    ({"lr": "nan"}, "--lr / field 'lr' must be > 0"),
    ({"epochs": "nan"}, "--epochs / field 'epochs' must be > 0"),
    ({"alpha": "nan"}, "--alpha / field 'alpha' must be > 0"),
    ({"benign": "none", "init": "lda"}, "needs benign prompts"),
    ({"data": "nope.jsonl"}, "nope.jsonl"),
])
def test_a_typo_leaves_nothing_and_the_corrected_rerun_runs(typo, needle, tiny_model_dir, harmful_file, benign_file,
                                                            tmp_path, capsys):
    """Before, `train --layers 5 --out X` (or a bad --target-modules, --lr nan) left train_config.json in X: the
    corrected rerun said X already holds results and --resume gave a traceback."""
    out = tmp_path / "run"
    good = recipe(tiny_model_dir, harmful_file, benign_file, epochs=1, eval_every=0)
    rc, err = run(argv(out, {**good, **typo}), capsys)
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert not out.exists()
    if typo in ({"layers": "5"}, {"target_modules": "up_prj"}):  # the corrected command runs (twice is enough)
        rc, err = run(argv(out, good), capsys)
        assert rc == 0, err
        assert (out / "patch" / "patch.json").exists()


def test_out_naming_an_existing_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import safetypatch.jobs.train as job

    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    f = tmp_path / "file.txt"
    f.write_text("mine")
    rc, err = run(["train", "--out", str(f)], capsys)
    assert rc == 2 and "is a file" in err and f.read_text() == "mine"


def interrupted_run(fields, out, monkeypatch, at_call=5):
    """Train until the `at_call`-th loss computation raises KeyboardInterrupt (a kill after the checkpoint at step
    3, with eval_every 3); returns the recipe."""
    import safetypatch.training.step as step

    cfg = from_dict(TrainConfig, fields)
    real, calls = step.compute_loss, {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(step, "compute_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    monkeypatch.setattr(step, "compute_loss", real)
    return cfg


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_with_changed_flags_is_refused_before_the_model_loads(tiny_model_dir, harmful_file, benign_file,
                                                                     tmp_path, capsys, monkeypatch):
    import safetypatch.jobs.train as job

    fields = recipe(tiny_model_dir, harmful_file, benign_file)
    out = tmp_path / "run"
    interrupted_run(fields, out, monkeypatch)
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc, err = run(argv(out, {**fields, "lr": "0.01", "rank": "4"}, "--resume"), capsys)
    assert rc == 2 and "different recipe" in err and "'lr'" in err and "'rank'" in err
    rc, err = run(argv(out, fields), capsys)
    assert rc == 2 and "already holds results" in err and "--resume" in err


def test_resume_does_not_repeat_log_steps(tiny_model_dir, harmful_file, benign_file, tmp_path, capsys, monkeypatch):
    """Killed during step 5 after the checkpoint at step 3: train_log.jsonl held steps 1-4, and the resumed run
    appended 4-10 again (4 twice); now the lines past the checkpoint are dropped first."""
    fields = recipe(tiny_model_dir, harmful_file, benign_file)
    out = tmp_path / "run"
    interrupted_run(fields, out, monkeypatch)
    assert steps(out / "train_log.jsonl") == [1, 2, 3, 4]
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the partial last line of a killed writer
    rc, err = run(argv(out, fields, "--resume"), capsys)
    assert rc == 0, err
    assert steps(out / "train_log.jsonl") == list(range(1, 11))
    dev = steps(out / "dev_log.jsonl")
    assert dev == sorted(set(dev)) and dev[0] == 0


@pytest.mark.parametrize("damage,name", [
    (lambda ck: (ck / "state.safetensors").write_bytes((ck / "state.safetensors").read_bytes()[:100]),
     "state.safetensors"),
    (lambda ck: (ck / "state.safetensors").write_bytes(b""), "state.safetensors"),
    (lambda ck: (ck / "state.json").write_text('{"step": 3, "tok'), "state.json"),
    (lambda ck: (ck / "state.json").write_text("[1, 2]"), "state.json"),
    (lambda ck: (ck / "state.json").write_text('{"step": 3}'), "state.json"),
    (lambda ck: (ck / "state.json").write_bytes(b"\xff\xfe\x00"), "state.json"),
])
def test_a_damaged_checkpoint_is_a_clear_error_and_the_fix_works(damage, name, tiny_model_dir, harmful_file,
                                                                 benign_file, tmp_path, capsys, monkeypatch):
    fields = recipe(tiny_model_dir, harmful_file, benign_file, epochs=1)
    out = tmp_path / "run"
    interrupted_run(fields, out, monkeypatch, at_call=4)
    ck = out / "checkpoint"
    damage(ck)
    rc, err = run(argv(out, fields, "--resume"), capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert f"{ck / name}:" in err and f"Delete {ck}" in err and "new --out" in err
    shutil.rmtree(ck)  # the fix the message gives: restart the run from step 0
    rc, err = run(argv(out, fields, "--resume"), capsys)
    assert rc == 0, err
    assert steps(out / "train_log.jsonl") == list(range(1, 6))


def test_a_damaged_train_config_is_a_clear_error(tiny_model_dir, harmful_file, benign_file, tmp_path, capsys,
                                                 monkeypatch):
    fields = recipe(tiny_model_dir, harmful_file, benign_file, epochs=1)
    out = tmp_path / "run"
    interrupted_run(fields, out, monkeypatch, at_call=4)
    (out / "train_config.json").write_text("{")
    rc, err = run(argv(out, fields, "--resume"), capsys)
    assert rc == 2 and "train_config.json: damaged" in err and "new --out" in err
