"""The command line as a whole: every README command line parses, building and parsing imports nothing heavy,
every flag's default is its dataclass's default, and errors print as `error: ...` with exit status 2."""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safetypatch.cli import build_parser, main
from safetypatch.cli.flags import add_flags, config_from_args, recipe_from_args

ROOT = Path(__file__).resolve().parents[1]


def readme_command_lines() -> list[list[str]]:
    """argv of every `safetypatch ...` line in README.md's code blocks (continuation lines joined, comments cut);
    a line with an optional `[...]` part gives two: with it and without it."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("safetypatch "):
                out.append(shlex.split(line.replace("[", "").replace("]", ""))[1:])
                if "[" in line:
                    out.append(shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:])
    return out


def test_readme_has_the_commands():
    commands = {argv[0] if argv[0] != "patch" else f"patch {argv[1]}" for argv in readme_command_lines()}
    assert {"train", "eval", "demo", "runs", "compare", "analyze", "calibrate", "chat", "redteam", "patch info",
            "patch stack", "patch scale", "patch merge", "patch unmerge", "patch project",
            "patch export"} <= commands


@pytest.mark.parametrize("argv", readme_command_lines(), ids=" ".join)
def test_every_readme_command_line_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_building_and_parsing_imports_nothing_heavy():
    code = ("import sys; sys.path.insert(0, 'tests'); from test_cli_parser import readme_command_lines; "
            "from safetypatch.cli import build_parser; [build_parser().parse_args(a) for a in readme_command_lines()]; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def parse(argv):
    return build_parser().parse_args(argv)


def test_defaults_come_from_the_dataclasses():
    from safetypatch.cli.calibrate import CalibrateArgs
    from safetypatch.cli.patch import ExportArgs, ProjectArgs, StackArgs
    from safetypatch.cli.redteam import RedteamArgs
    from safetypatch.jobs.analyze import AnalyzeConfig
    from safetypatch.jobs.calibrate import CalibrationConfig
    from safetypatch.jobs.chat import ChatConfig
    from safetypatch.jobs.evaluate import EvalConfig
    from safetypatch.jobs.redteam import RedteamConfig
    from safetypatch.training.config import TrainConfig

    cases = [
        (["eval", "--out", "o"], EvalConfig(out="o")),
        (["calibrate", "--patch", "p"], CalibrationConfig()), (["calibrate", "--patch", "p"], CalibrateArgs(patch="p")),
        (["redteam", "--patch", "p", "--out", "o"], RedteamConfig()),
        (["redteam", "--patch", "p", "--out", "o"], RedteamArgs(patch="p", out="o")),
        (["chat"], ChatConfig()), (["analyze", "--patch", "p"], AnalyzeConfig(patch="p")),
        (["patch", "export", "p", "--format", "gguf", "-o", "x"], ExportArgs(patch="p", format="gguf", out="x")),
        (["patch", "project", "p", "-o", "x"], ProjectArgs(patch="p", out="x")),
        (["patch", "stack", "a", "b", "-o", "x"], StackArgs(patches=["a", "b"], out="x")),
    ]
    for argv, want in cases:
        assert config_from_args(type(want), parse(argv)) == want, argv
    assert recipe_from_args(TrainConfig, parse(["train", "--out", "o"]), None) == TrainConfig()
    assert recipe_from_args(TrainConfig, parse(["demo"]), None) == TrainConfig()


def test_flags_override_and_convert():
    from safetypatch.jobs.calibrate import CalibrationConfig
    from safetypatch.jobs.evaluate import EvalConfig
    from safetypatch.jobs.redteam import RedteamConfig

    cfg = config_from_args(EvalConfig, parse(["eval", "--suite", "quick", "--out", "o", "--shared", "d",
                                              "--judge-model", "a=x/y", "--judge-model", "z/w", "--max-new-tokens",
                                              "3", "--no-db"]))
    assert (cfg.data_root, cfg.judge_model, cfg.max_new_tokens, cfg.no_db) == ("d", ["a=x/y", "z/w"], 3, True)
    cal = config_from_args(CalibrationConfig, parse(["calibrate", "--patch", "p", "--factors", "0.5,1",
                                                     "--max-over-refusal", "0.1"]))
    assert cal.factors == (0.5, 1.0) and cal.max_over_refusal == 0.1
    red = config_from_args(RedteamConfig, parse(["redteam", "--patch", "p", "--out", "o", "--attacks", "aim,aim"]))
    assert red.attacks == ("none", "aim")
    args = parse(["patch", "stack", "P1", "P2", "-o", "OUT", "--weights=-1,1"])
    assert args.weights == "-1,1" and args.patches == ["P1", "P2"]


def test_recipe_flags_override_the_yaml(tmp_path):
    from safetypatch.training.config import TrainConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rank: 4\nlr: 0.0005\nfreeze_a: true\n")
    args = parse(["train", "--config", str(recipe), "--rank", "2", "--freeze-a", "false", "--out", "o"])
    cfg = recipe_from_args(TrainConfig, args, args.config)
    assert (cfg.rank, cfg.lr, cfg.freeze_a) == (2, 5e-4, False)


@dataclass(kw_only=True)
class Demo:
    src: list[str] = field(metadata={"positional": True, "nargs": "+"})
    out: str = field(metadata={"flags": ("-o", "--out"), "required": True})
    mode: str = field(default="a", metadata={"choices": ("a", "b"), "help": "mode"})
    tag: list[str] = field(default_factory=list, metadata={"action": "append"})
    left: str | None = field(default=None, metadata={"one_of": "side"})
    right: str | None = field(default=None, metadata={"one_of": "side"})
    count: int | None = None
    fast: bool = False


def demo_parser():
    import argparse

    p = argparse.ArgumentParser()
    add_flags(p, Demo)
    return p


def test_metadata_convention():
    p = demo_parser()
    got = config_from_args(Demo, p.parse_args(["x", "y", "-o", "O", "--tag", "t1", "--tag", "t2", "--left", "L",
                                               "--count", "3", "--fast"]))
    assert got == Demo(src=["x", "y"], out="O", tag=["t1", "t2"], left="L", count=3, fast=True)
    assert config_from_args(Demo, p.parse_args(["x", "--out", "O", "--right", "R"])) == Demo(src=["x"], out="O",
                                                                                             right="R")
    assert "(default: a)" in p.format_help()
    for bad in (["x", "-o", "O"], ["x", "-o", "O", "--left", "L", "--right", "R"], ["x", "-o", "O", "--left", "L",
                                                                                 "--mode", "c"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_a_tuple_field_needs_a_converter():
    import argparse

    @dataclass
    class Bad:
        ks: tuple[int, ...] = (1, 2)

    with pytest.raises(TypeError, match="ks"):
        add_flags(argparse.ArgumentParser(), Bad)


def test_main_prints_any_safetypatch_error(tmp_path, capsys, monkeypatch):
    import safetypatch.patches
    from safetypatch.errors import SafetypatchError

    assert main(["patch", "info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such patch directory" in err

    def broken(*args, **kwargs):
        raise SafetypatchError("the base class too")

    monkeypatch.setattr(safetypatch.patches, "patch_info", broken)
    assert main(["patch", "info", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: the base class too\n"
    assert main(["eval", "--suite", "quick", "--prompts", "p.jsonl", "--out", str(tmp_path / "y")]) == 2
    assert "give either --suite or --prompts, not both" in capsys.readouterr().err


def test_only_cli_builds_parsers():
    src = ROOT / "src" / "safetypatch"
    outside = [p.relative_to(src) for p in src.rglob("*.py") if "cli" not in p.relative_to(src).parts
               and re.search(r"\bimport argparse\b|add_parser\(|add_subparsers\(", p.read_text())]
    assert outside == []
