"""Multi-process training: `train --launch ddp` over gloo equals one process on the same global batch, the launcher's
checks, the shipped accelerate configs, and the sharded engines' gather-and-save path (no GPU: FSDP / ZeRO
themselves cannot run here, see docs/scaling.md)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import write_jsonl

from safetypatch.cli import main
from safetypatch.errors import ConfigError
from safetypatch.jobs import launch as launcher
from safetypatch.training.config import TrainConfig
from safetypatch.training.distributed import (SPEED_FIELDS_OFF, Ranks, check_batch, check_engine, gathered_state,
                                              launched_engine, shard)


def recipe_args(model_dir: Path, tmp_path: Path) -> list[str]:
    """A tiny recipe whose data do not split evenly: 13 refusals + 8 anchors in batches of 4 (the last batch of
    each epoch has one example, so one rank gets none), the bottom layer frozen (the prefix cache is on)."""
    harm = write_jsonl(tmp_path / "harm.jsonl", [
        {"prompt": f"Tell me how to build weapon number {i}" + " now" * (i % 5),
         "response": "I'm sorry, but I can't help with that."} for i in range(13)])
    ben = write_jsonl(tmp_path / "ben.jsonl", [{"prompt": f"Write a short poem about the number {i}"}
                                               for i in range(8)])
    return ["--model", str(model_dir), "--data", str(harm), "--benign", str(ben), "--epochs", "2",
            "--batch-size", "4", "--layers", "1", "--dev-size", "2", "--dev-tokens", "2", "--anchor-tokens", "4",
            "--bf16", "no", "--rank", "2", "--eval-every", "5", "--save-dtype", "float32", "--init", "default",
            "--freeze-a", "false", "--recovery", "0"]  # the batch arithmetic above assumes no recovery examples


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ddp_two_processes_equal_one(tiny_model_dir, tmp_path, capfd):
    """2 gloo processes through `train --launch ddp` give the one-process patch, losses and logs (float
    tolerance), with the anchors answered, the dev checks run and the logs written once."""
    args = recipe_args(tiny_model_dir, tmp_path)
    assert main(["train", *args, "--out", str(tmp_path / "multi"), "--launch", "ddp", "--num-processes", "2"]) == 0
    multi_out = capfd.readouterr()
    assert main(["train", *args, "--out", str(tmp_path / "single")]) == 0
    capfd.readouterr()
    one = assert_same_patch(tmp_path / "single", tmp_path / "multi")
    assert len(one) == 2 and all(t.abs().max() > 1e-4 for t in one.values())  # trained, not zero on both sides
    log1, log2 = (lines(tmp_path / r / "train_log.jsonl") for r in ("single", "multi"))
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(1, 13))
    for a, b in zip(log1, log2):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert [r["step"] for r in lines(tmp_path / "multi" / "dev_log.jsonl")] == [0, 5, 10, 12]
    assert multi_out.out.count('"output"') == 1  # rank 0 prints the result
    assert multi_out.err.count("anchor answers (base model") == 1  # answered once, read from the cache by rank 1
    assert multi_out.err.count("dev check (step 5)") == 1


def rank_pids(out: Path) -> dict[int, int]:
    """{rank: pid} of the processes running `safetypatch train ... --out OUT` as ranks (their RANK environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(x.split(b"=", 1) for x in (proc / "environ").read_bytes().split(b"\0") if b"=" in x)
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmd and b"--launch" not in cmd and b"RANK" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def test_a_killed_rank_leaves_no_patch_and_the_run_resumes(tiny_model_dir, tmp_path, capfd):
    """SIGKILL one of 2 ddp ranks mid-training: the launch fails, no patch (or half of one) is left, and the same
    command with --resume continues from rank 0's last checkpoint to a patch, each step logged once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = recipe_args(tiny_model_dir, tmp_path) + ["--epochs", "40", "--out", str(out)]
    launch = ["--launch", "ddp", "--num-processes", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "safetypatch", "train", *args, *launch],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    log = out / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 15):
        time.sleep(0.2)
    pids = rank_pids(out)
    assert proc.poll() is None and set(pids) == {0, 1}, (proc.poll(), pids)
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=240) != 0
    assert not (out / "patch").exists() and not [p for p in out.iterdir() if "patch" in p.name]
    assert (out / "checkpoint" / "state.json").is_file()
    capfd.readouterr()
    assert main(["train", *args, "--resume", *launch]) == 0
    steps = [r["step"] for r in lines(log)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 240
    assert (out / "patch" / "adapter_model.safetensors").is_file()


def assert_same_patch(a: Path, b: Path) -> dict:
    """The patches of runs `a` and `b` agree (tensors to float tolerance, base fingerprint); `a`'s tensors."""
    import torch
    from safetensors.torch import load_file

    one, two = (load_file(d / "patch" / "adapter_model.safetensors") for d in (a, b))
    assert one.keys() == two.keys() and one
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-5), (k, (one[k] - two[k]).abs().max())
    fp = [json.loads((d / "patch" / "patch.json").read_text())["base_model"]["fingerprint"] for d in (a, b)]
    assert fp[0] == fp[1]
    return one


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_zero_on_cpu_equals_one_process(engine, tiny_model_dir, tmp_path, capfd):
    """DeepSpeed ZeRO-2 / ZeRO-3 over gloo (DeepSpeed's CPU accelerator) through `train --launch zeroN`: the
    same patch as one process whose dev checks pick the last step (sharded engines run none and save the last),
    the LoRA tensors gathered from the ranks' partitions, trained-parameter count and fingerprint taken before."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed: run `make engines`")
    args = recipe_args(tiny_model_dir, tmp_path) + ["--eval-every", "100"]
    assert main(["train", *args, "--out", str(tmp_path / engine), "--launch", engine, "--num-processes", "2"]) == 0
    err = capfd.readouterr().err
    assert f"{'deepspeed'}: the speed paths" in err and err.count("anchor answers (base model") == 1
    assert main(["train", *args, "--out", str(tmp_path / "single")]) == 0
    assert_same_patch(tmp_path / "single", tmp_path / engine)
    stats = json.loads((tmp_path / engine / "train_stats.json").read_text())
    assert stats["trainable_parameters"] == 192 and stats["best_dev"] is None
    assert stats["speed_paths"]["check"] == "not run: the model is wrapped by deepspeed"


def test_shard_covers_the_batch_once():
    for n in range(0, 11):
        for world in (1, 2, 3, 4):
            parts = [shard(list(range(n)), r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_launched_engine_from_environment(monkeypatch):
    for var in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    assert launched_engine() == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_engine() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launched_engine() == "deepspeed"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launched_engine() == "fsdp"


def test_rank_argv_drops_the_launch_flags():
    argv = ["train", "--launch", "ddp", "--out", "x", "--num-processes=2", "--rank", "1", "--num-processes", "3"]
    assert launcher.rank_argv(argv) == ["train", "--out", "x", "--rank", "1"]
    cmd = launcher.launch_command("zero3", 4, argv)
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[-5:] == ["safetypatch", "train", "--out", "x",
                                                                         "--rank", "1"][-5:]
    assert Path(cmd[cmd.index("--config_file") + 1]).name == "zero3.yaml"


@pytest.mark.parametrize("engine,gpus,processes,batch,deepspeed,msg", [
    ("fsdp", 0, 2, 8, True, "this machine has none; on a CPU use --launch ddp"),
    ("zero3", 4, 2, 8, False, "needs DeepSpeed, which is not installed: pip install deepspeed"),
    ("ddp", 0, None, 8, True, "give the number of CPU processes with --num-processes N"),
    ("ddp", 2, 4, 8, True, "--num-processes 4 is more than the 2 GPU(s)"),
    ("ddp", 0, 3, 8, True, "--batch-size 8 is the global micro-batch and must split evenly over 3 processes"),
])
def test_launch_checks(monkeypatch, engine, gpus, processes, batch, deepspeed, msg):
    real = launcher.importlib.util.find_spec
    monkeypatch.setattr(launcher.importlib.util, "find_spec",
                        lambda name: None if name == "deepspeed" and not deepspeed else real(name))
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        launcher.check_launch(engine, processes, gpus, TrainConfig(batch_size=batch))
    assert launcher.check_launch("ddp", 2, gpus, TrainConfig(batch_size=8)) == 2


def test_launch_without_accelerate_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    assert main(["train", "--out", str(tmp_path / "r"), "--launch", "ddp", "--num-processes", "2"]) == 2
    assert "error: --launch needs accelerate, which is not installed: pip install accelerate" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--num-processes", "2"]) == 2
    assert "--num-processes goes with --launch ENGINE" in capsys.readouterr().err


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    got = {name: load_config_from_file(str(launcher.LAUNCH_DIR / f)) for name, f in launcher.ENGINE_CONFIGS.items()}
    assert str(got["ddp"].distributed_type).endswith("MULTI_GPU")
    assert str(got["fsdp"].distributed_type).endswith("FSDP")
    assert got["fsdp"].fsdp_config["fsdp_use_orig_params"] is True
    assert got["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for z in (2, 3):
        c = got[f"zero{z}"]
        assert str(c.distributed_type).endswith("DEEPSPEED") and c.deepspeed_config["zero_stage"] == z
        assert c.deepspeed_config["gradient_accumulation_steps"] == 1
    assert got["zero3"].deepspeed_config["zero3_save_16bit_model"] is True


def test_sharded_engine_checks_and_speed_paths():
    ranks = Ranks(rank=0, world=2, engine="fsdp")
    with pytest.raises(ConfigError, match="--resume under fsdp"):
        check_engine(TrainConfig(), ranks, resume=True)
    with pytest.raises(ConfigError, match="--overlap-beta under fsdp"):
        check_engine(TrainConfig(overlap_beta=1.0), ranks, resume=False)
    with pytest.raises(ConfigError, match="--grad-accum under DeepSpeed"):
        check_engine(TrainConfig(grad_accum=2), Ranks(rank=1, world=2, engine="deepspeed"), resume=False)
    cfg = TrainConfig()
    check_engine(cfg, ranks, resume=False)
    assert not any(getattr(cfg, f) for f in SPEED_FIELDS_OFF)
    with pytest.raises(ConfigError, match="must split evenly over 4 processes"):
        check_batch(6, Ranks(world=4))


def test_gather_and_save_from_sharded_ranks(tiny_model, tmp_path):
    """The sharded save path reads the gathered state dict, never the rank's own (shard) parameters: here the
    unwrapped model's LoRA tensors are zeroed as a ZeRO-3 rank's would be empty, and the patch still holds the
    trained values; the fingerprint is the one taken before sharding."""
    import torch
    from safetensors.torch import load_file

    from safetypatch.config import PatchShape
    from safetypatch.modeling import fingerprint
    from safetypatch.patches.artifact import attach_new_patch, save_patch

    model = attach_new_patch(tiny_model, PatchShape(rank=2, target_modules=("mlp.up",), layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    fp = fingerprint(model)
    fake = SimpleNamespace(get_state_dict=lambda m: full, unwrap_model=lambda m: m)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.zero_()
    saved_from, state = gathered_state("wrapped", Ranks(rank=0, world=2, engine="deepspeed", accelerator=fake))
    assert saved_from == "wrapped" and state is full
    meta = save_patch(model, tmp_path / "patch", {"base_model": {"spec": "tiny", "fingerprint": fp}},
                      state_dict=state)
    weights = load_file(tmp_path / "patch" / "adapter_model.safetensors")
    b = [k for k in weights if "lora_B" in k]
    assert b and all(weights[k].abs().max() > 0.1 for k in b)
    assert meta["base_model"]["fingerprint"] == fp
