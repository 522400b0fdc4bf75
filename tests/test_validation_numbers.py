"""One validation layer for numbers (issue 16): every numeric flag and recipe field is finite and in range when the
config is built, before any output exists or any model loads; the error names the flag (or field) and the range.
No parser takes an abbreviated flag. The fuzz tests: any value of any numeric field, through `from_dict` or the
command line, builds a valid config or raises the project's own error (argparse's exit 2 for unparseable text)."""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetypatch.cli import build_parser, main
from safetypatch.cli.calibrate import CalibrateArgs
from safetypatch.cli.evaluate import RunsArgs
from safetypatch.cli.flags import config_from_args, recipe_from_args
from safetypatch.cli.redteam import RedteamArgs
from safetypatch.cli.train import DemoArgs
from safetypatch.config import GenerationConfig, PatchShape, from_dict, number_ok, numeric_kind
from safetypatch.errors import ConfigError, SafetypatchError
from safetypatch.jobs.calibrate import CalibrationConfig
from safetypatch.jobs.chat import ChatConfig
from safetypatch.jobs.evaluate import EvalConfig
from safetypatch.jobs.redteam import RedteamConfig
from safetypatch.training.config import TrainConfig

CLASSES = [TrainConfig, PatchShape, GenerationConfig, EvalConfig, CalibrationConfig, RedteamConfig, ChatConfig,
           DemoArgs, RunsArgs, RedteamArgs]
REQUIRED = {EvalConfig: {"out": "o"}, RedteamArgs: {"patch": "p", "out": "o"}, CalibrateArgs: {"patch": "p"}}
NUMERIC = [(cls, f) for cls in CLASSES for f in fields(cls) if numeric_kind(f)]


def run(argv, capsys):
    """main(argv) -> (exit status, stderr)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------- every class has ranges
def test_every_numeric_field_of_the_owned_configs_has_a_range():
    """A numeric field without bounds would take any finite value; every one states its range (or, for seeds and
    weights that may be 0, a lower bound)."""
    unbounded = [f"{cls.__name__}.{f.name}" for cls, f in NUMERIC
                 if not {"min", "gt", "max", "lt"} & set(f.metadata)]
    assert unbounded == []
    assert len(NUMERIC) >= 40


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", ["--lr", "--epochs", "--alpha", "--weight-decay", "--dropout", "--benign-weight"])
def test_train_refuses_non_finite_numbers_before_anything_exists(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run(["train", "--out", str(out), "--model", str(tmp_path / "never-loaded"), f"{flag}={value}"], capsys)
    assert rc == 2 and flag in err and "finite" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv,flag,rule", [
    (["--limit", "-3"], "--limit", ">= 1"),
    (["--limit", "0"], "--limit", ">= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["--batch-size", "-1"], "--batch-size", ">= 1"),
])
def test_eval_refuses_counts_below_one(argv, flag, rule, tmp_path, capsys, monkeypatch):
    """`--limit -3` used to evaluate 81 of 84 prompts (a Python slice), `--limit 0` all of them, and
    `--max-new-tokens 0` empty answers, all certified; now each is refused before the model loads."""
    import safetypatch.modeling

    monkeypatch.setattr(safetypatch.modeling, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "ev"
    rc, err = run(["eval", "--out", str(out), *argv], capsys)
    assert rc == 2 and f"{flag} / field '{flag[2:].replace('-', '_')}' must be {rule}" in err
    assert not out.exists()


def test_suite_file_and_command_line_agree_on_a_negative_limit(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("entries:\n  - {benchmark: builtin_harmful, limit: -2}\n")
    rc, err = run(["eval", "--suite", str(suite), "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "limit" in err
    rc, err = run(["eval", "--suite", "quick", "--limit", "-2", "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "--limit / field 'limit' must be >= 1" in err
    suite.write_text("generation: {max_new_tokens: 0}\nentries:\n  - {benchmark: builtin_harmful}\n")
    rc, err = run(["eval", "--suite", str(suite), "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "max_new_tokens" in err and ">= 1" in err


@pytest.mark.parametrize("argv,flag,rule", [
    (["calibrate", "--patch", "P", "--factors", "nan,1"], "--factors", ">= 0"),
    (["calibrate", "--patch", "P", "--factors=-1,1"], "--factors", ">= 0"),
    (["calibrate", "--patch", "P", "--max-over-refusal", "2"], "--max-over-refusal", "in [0, 1]"),
    (["calibrate", "--patch", "P", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["redteam", "--patch", "P", "--out", "O", "--rounds", "-1"], "--rounds", ">= 0"),
    (["redteam", "--patch", "P", "--out", "O", "--per-round", "0"], "--per-round", ">= 1"),
    (["redteam", "--patch", "P", "--out", "O", "--holdout-every", "1"], "--holdout-every", ">= 2"),
    (["redteam", "--patch", "P", "--out", "O", "--epochs", "nan"], "--epochs", "> 0"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["runs", "--limit", "-1"], "--limit", ">= 1"),
    (["demo", "--eval-limit", "0"], "--eval-limit", ">= 1"),
    (["demo", "--epochs", "nan"], "--epochs", "> 0"),
])
def test_other_commands_refuse_numbers_out_of_range(argv, flag, rule, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run(argv, capsys)
    assert rc == 2 and f"{flag} / field '{flag[2:].replace('-', '_')}' must be {rule}" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written (no run directory, no results database)


def test_recipe_fields_name_the_file_and_the_range(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: .nan\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: field 'lr' must be > 0 \(a finite number\), got nan"):
        recipe_from_args(TrainConfig, build_parser().parse_args(["train", "--out", "o"]), str(recipe))
    with pytest.raises(ConfigError, match=r"field 'seed' must be in \[0, 4294967295\]"):
        from_dict(TrainConfig, {"seed": 2**40})
    with pytest.raises(ConfigError, match="field 'top_p'"):
        from_dict(GenerationConfig, {"top_p": 0})
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(GenerationConfig, {"do_sample": True, "temperature": 0})
    with pytest.raises(ConfigError, match=r"redteam: train \(each round's recipe\): field 'epochs'"):
        RedteamConfig(train={"epochs": float("nan")}).validate("redteam")


def test_good_numbers_are_unchanged():
    assert from_dict(TrainConfig, {}) == TrainConfig()
    assert from_dict(TrainConfig, {"lr": "5e-4", "epochs": "0.5", "rank": "2", "dropout": 0}) == TrainConfig(
        lr=5e-4, epochs=0.5, rank=2, dropout=0.0)
    assert config_from_args(EvalConfig, build_parser().parse_args(["eval", "--out", "o", "--limit", "1"])).limit == 1
    cal = config_from_args(CalibrationConfig, build_parser().parse_args(["calibrate", "--patch", "p", "--factors",
                                                                         "0,0.5,1"]))
    assert cal.factors == (0.0, 0.5, 1.0)


# ------------------------------------------------------------------------------------------ no abbreviations
@pytest.mark.parametrize("argv", [
    ["eval", "--out", "o", "--max-new-token", "3"],
    ["train", "--out", "o", "--weight-dec", "0.1"],
    ["patch", "scale", "P", "--fact", "2", "-o", "x"],
    ["calibrate", "--pat", "P"],
])
def test_abbreviated_flags_are_refused(argv):
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and ("unrecognized arguments" in err.getvalue() or "required" in err.getvalue())


# ------------------------------------------------------------------------------------------------------ fuzz
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1.0, 2**31, 2**31 - 1, 2**32, 1e300, -1e300, 10**400, True, False, None]),
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", " 3 ", "", "none", "1,2", "[1]"]),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(NUMERIC), value=VALUES)
def test_fuzz_from_dict_builds_a_valid_config_or_raises_its_own_error(case, value):
    cls, f = case
    try:
        obj = from_dict(cls, {**REQUIRED.get(cls, {}), f.name: value})
    except SafetypatchError:
        return
    got = getattr(obj, f.name)
    kind = numeric_kind(f)
    items = got if isinstance(got, (tuple, list)) else [got]
    assert got is None or all(number_ok(v, kind, f) for v in items), (cls.__name__, f.name, value, got)


def argv_for(cls, f):
    """A command line of the command that has `cls`'s fields as flags."""
    if cls in (TrainConfig, PatchShape):
        return ["train", "--out", "o"]
    return {EvalConfig: ["eval", "--out", "o"], CalibrationConfig: ["calibrate", "--patch", "p"],
            RedteamConfig: ["redteam", "--patch", "p", "--out", "o"], RedteamArgs: ["redteam", "--patch", "p",
                                                                                 "--out", "o"],
            ChatConfig: ["chat"], DemoArgs: ["demo"], RunsArgs: ["runs"]}[cls]


CLI_NUMERIC = [(c, f) for c, f in NUMERIC if c is not GenerationConfig and f.name != "train"]
TEXT = st.one_of(st.text(max_size=10), st.integers(min_value=-(2**70), max_value=2**70).map(str),
                 st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.sampled_from(["nan", "inf", "-1", "0", "1e309", "0.5,nan", "1,,2", "2147483648"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CLI_NUMERIC), text=TEXT)
def test_fuzz_numeric_flags_parse_to_a_valid_config_or_a_clear_error(case, text):
    cls, f = case
    flag = f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))[0]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = build_parser().parse_args([*argv_for(cls, f), f"{flag}={text}"])
        except SystemExit as e:
            assert e.code == 2  # argparse's usage error for text it cannot convert
            return
    try:
        if cls in (TrainConfig, PatchShape):
            obj = recipe_from_args(TrainConfig, args, None)
        else:
            obj = config_from_args(cls, args)
    except SafetypatchError as e:
        assert flag in str(e) or f"'{f.name}'" in str(e)
        return
    value = getattr(obj, f.name)
    items = value if isinstance(value, (tuple, list)) else [value]
    assert value is None or all(number_ok(v, numeric_kind(f), f) for v in items)
    assert all(math.isfinite(v) for v in items if value is not None)


YAML_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(st.binary(max_size=60),
                     st.dictionaries(st.one_of(st.sampled_from([f.name for f in fields(TrainConfig)]),
                                               st.text(max_size=5), st.integers()), YAML_VALUES, max_size=4)
                     .map(lambda d: __import__("yaml").safe_dump(d).encode()),
                     YAML_VALUES.map(lambda v: __import__("yaml").safe_dump(v).encode())))
def test_fuzz_recipe_files_load_or_raise_config_error(doc, tmp_path):
    from safetypatch.config import load_yaml

    recipe = tmp_path / "fuzz.yaml"
    recipe.write_bytes(doc)
    try:
        cfg = load_yaml(TrainConfig, recipe)
    except ConfigError as e:
        assert str(e).startswith(str(recipe))
        return
    cfg.validate()  # what loaded is a valid recipe
