"""`safetypatch sweep`: sweep files (shipped and bad ones), the dry run, a whole tiny sweep (train, evaluate with a
suite, analyse, point.json), reruns that skip finished work, a killed point that restarts, a changed recipe that
is refused, and `--jobs` (GPU-only, refused on CPU; its worker processes checked with CPU "devices")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from safetypatch.cli import main
from safetypatch.errors import ConfigError
from safetypatch.jobs.sweep import plan_sweep, run_sweep
from safetypatch.jobs.sweep_spec import SweepConfig, point_dir
from safetypatch.jobs.sweep_spec import list_sweeps, load_sweep

SHIPPED = {"rank": 6, "modules": 9, "layers": 4, "lora_vs_full": 3, "data_ratio": 4}
FAST = {"epochs": 1, "batch_size": 4, "dev_size": 2, "dev_tokens": 2, "anchor_tokens": 4, "lr": 0.05,
        "max_length": 64, "eval_every": 0}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_suite(tmp_path):
    return write(tmp_path / "tiny_suite.yaml", {
        "name": "tiny", "judges": ["refusal_xstest"], "generation": {"max_new_tokens": 3, "batch_size": 8},
        "entries": [{"benchmark": "builtin_harmful", "limit": 3}, {"benchmark": "builtin_benign", "limit": 3},
                    {"type": "kl", "name": "kl_builtin_benign", "benchmark": "builtin_benign", "limit": 2}]})


@pytest.fixture()
def tiny_sweep(tmp_path, tiny_model_dir, harmful_file, benign_file, tiny_suite):
    recipe = {**FAST, "model": str(tiny_model_dir), "data": str(harmful_file), "benign": str(benign_file),
              "dev_harmful": str(harmful_file), "dev_benign": str(benign_file), "target_modules": ["up_proj"],
              "layers": "all"}
    return write(tmp_path / "tiny_sweep.yaml", {"name": "tiny", "recipe": recipe, "grid": {"rank": [1, 2]},
                                                "eval": {"suite": str(tiny_suite)}, "geometry": True})


def test_every_shipped_sweep_loads_with_and_without_quick():
    assert sorted(SHIPPED) == list_sweeps()
    for name, n in SHIPPED.items():
        for quick in (False, True):
            sweep = load_sweep(name, quick=quick, data_root="/data")
            assert len(sweep.points) == n and len({p.name for p in sweep.points}) == n
    quick = load_sweep("rank", quick=True)
    assert quick.points[0].recipe.epochs < load_sweep("rank").points[0].recipe.epochs
    assert quick.eval["limit"] == 30
    ratio = load_sweep("data_ratio", data_root="/data")
    assert ratio.points[1].recipe.mix.startswith("/data/alpaca_eval/") and ratio.points[1].recipe.mix_ratio == 0.1
    modules = load_sweep("modules")
    assert [p.recipe.target_modules for p in modules.points][:2] == [["attn.q"], ["attn.k"]]


@pytest.mark.parametrize("data, message", [
    ({"grid": {"rnak": [1, 2]}}, "'rnak' is not a recipe field (did you mean 'rank'?); valid keys: "),
    ({"grid": {"rank": []}}, "grid.rank must be a non-empty list"),
    ({"grid": {}}, "no points: give 'grid'"),
    ({"grid": {"rank": [1, "four"]}}, "field 'rank' expects int, got 'four'"),
    ({"grid": {"rank": [0]}}, "rank"),
    ({"grid": {"method": ["lora", "lorra"]}}, "field 'method' must be one of"),
    ({"points": [{"name": "a", "rank": 1}, {"name": "a", "rank": 2}]}, "repeats point 1"),
    ({"points": "rank=1"}, "'points' must be a non-empty list"),
    ({"grid": {"rank": [1]}, "gird": 1}, "unknown top-level field(s) ['gird']"),
    ({"grid": {"rank": [1]}, "eval": {"limit": 0}}, "eval.limit must be an integer >= 1"),
    ({"grid": {"rank": [1]}, "eval": {"suit": "quick"}}, "eval: unknown key(s) ['suit']"),
    ({"grid": {"rank": [1]}, "recipe": {"epoch": 1}}, "did you mean 'epochs'"),
    ({"grid": {"mix_ratio": [0.0]}, "recipe": {"benign": "none"}}, "init 'lda' needs benign prompts"),
])
def test_bad_sweep_files_name_the_key(tmp_path, data, message):
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_sweep(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_bad_sweep_on_the_command_line_is_one_error_line(tmp_path, capsys):
    path = write(tmp_path / "bad.yaml", {"grid": {"rnak": [1]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rnak" in err and "Traceback" not in err
    assert main(["sweep", "no_such_sweep", "--out", str(tmp_path / "o")]) == 2
    assert "shipped sweeps: data_ratio, layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_point_the_model_cannot_take_fails_before_training(tmp_path, tiny_sweep, capsys):
    data = yaml.safe_load(tiny_sweep.read_text())
    data["grid"] = {"target_modules": ["up_proj", "attn.qq"]}
    write(tiny_sweep, data)
    assert main(["sweep", str(tiny_sweep), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "point target_modules-attn.qq" in err and not (tmp_path / "o").exists()


def test_dry_run_lists_points_and_costs(tmp_path, tiny_sweep, capsys):
    assert main(["sweep", str(tiny_sweep), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rank-1" in out and "rank-2" in out and "est. seconds" in out and "estimated total" in out
    assert not (tmp_path / "o").exists()


def test_tiny_sweep_end_to_end_rerun_and_restart(tmp_path, tiny_sweep, capsys):
    out = tmp_path / "sweep"
    cfg = SweepConfig(sweep=str(tiny_sweep), out=str(out), db=str(tmp_path / "r.db"))
    text = run_sweep(cfg)
    assert "rank-1" in text and "(base)" in text
    record = json.loads((out / "sweep.json").read_text())
    assert record["kind"] == "safetypatch-sweep" and record["axes"] == ["rank"]
    assert [p["values"] for p in record["points"]] == [{"rank": 1}, {"rank": 2}]
    for name in ("rank-1", "rank-2"):
        d = point_dir(out, name)
        point = json.loads((d / "point.json").read_text())
        assert point["status"] == "done" and point["output"] == "train/patch"
        assert (d / "train/patch/adapter_model.safetensors").exists() and (d / "eval/summary.json").exists()
        assert json.loads((d / "geometry/geometry.json").read_text())
        assert set(point["headline"]) == {"base", "patched"} and "harmful_refusal" in point["headline"]["patched"]
    from safetypatch.evals.store import ResultsStore

    with ResultsStore(str(tmp_path / "r.db")) as store:
        names = [r["name"] for r in store.runs()]
    assert sorted(names) == ["sweep tiny/rank-1", "sweep tiny/rank-2"]

    # a rerun skips finished points: nothing is rewritten
    stamp = (point_dir(out, "rank-1") / "point.json").stat().st_mtime_ns
    run_sweep(cfg)
    assert (point_dir(out, "rank-1") / "point.json").stat().st_mtime_ns == stamp

    # a point killed during its evaluation: only that stage reruns, training is kept
    d = point_dir(out, "rank-2")
    patch_stamp = (d / "train/patch/adapter_model.safetensors").stat().st_mtime_ns
    (d / "point.json").unlink()
    (d / "eval/summary.json").unlink()
    run_sweep(cfg)
    assert (d / "point.json").exists() and (d / "eval/summary.json").exists()
    assert (d / "train/patch/adapter_model.safetensors").stat().st_mtime_ns == patch_stamp

    # a point killed during training (its run directory claimed and checkpointed, no patch yet): it resumes from
    # the checkpoint and finishes, every later stage rerun
    import shutil

    for gone in ("point.json", "train/patch", "eval", "geometry"):
        target = d / gone
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert (d / "train/train_config.json").exists() and (d / "train/checkpoint").exists()
    run_sweep(cfg)
    assert json.loads((d / "point.json").read_text())["status"] == "done"
    assert (d / "train/patch/adapter_model.safetensors").exists() and (d / "geometry/geometry.json").exists()


def test_changed_recipe_is_refused_then_rerun_with_overwrite(tmp_path, tiny_sweep):
    out = tmp_path / "sweep"
    run_sweep(SweepConfig(sweep=str(tiny_sweep), out=str(out), only="rank-1", db=str(tmp_path / "r.db")))
    data = yaml.safe_load(tiny_sweep.read_text())
    data["recipe"]["lr"] = 0.01
    write(tiny_sweep, data)
    cfg = SweepConfig(sweep=str(tiny_sweep), out=str(out), only="rank-1", db=str(tmp_path / "r.db"))
    with pytest.raises(Exception) as e:
        run_sweep(cfg)
    assert "changed: lr" in str(e.value) and "--overwrite" in str(e.value)
    cfg.overwrite = True
    run_sweep(cfg)
    assert json.loads((point_dir(out, "rank-1") / "point.json").read_text())["recipe"]["lr"] == 0.01


def test_only_names_unknown_points(tmp_path, tiny_sweep):
    with pytest.raises(ConfigError, match="'rank-3'.*its points: rank-1, rank-2"):
        plan_sweep(SweepConfig(sweep=str(tiny_sweep), out=str(tmp_path / "o"), only="rank-3"))


def test_jobs_needs_gpus(tmp_path, tiny_sweep):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --jobs is allowed")
    with pytest.raises(ConfigError, match="--jobs 2 runs one point per GPU"):
        run_sweep(SweepConfig(sweep=str(tiny_sweep), out=str(tmp_path / "o"), jobs=2))


def test_parallel_workers_run_each_point_once(tmp_path, tiny_sweep):
    """The --jobs scheduler with two CPU "devices": each point runs in its own process, as a serial sweep would."""
    from safetypatch.jobs.sweep_workers import run_parallel

    out = tmp_path / "sweep"
    cfg = SweepConfig(sweep=str(tiny_sweep), out=str(out), jobs=2, db=str(tmp_path / "r.db"))
    plan = plan_sweep(cfg)
    out.mkdir()
    run_parallel(plan, cfg, out, devices=["", ""])
    for name in ("rank-1", "rank-2"):
        assert json.loads((point_dir(out, name) / "point.json").read_text())["status"] == "done"
        assert (point_dir(out, name) / "worker.log").exists()
