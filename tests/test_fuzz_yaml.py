"""Fuzzing the YAML loaders (issue 16): the suite loader (`load_suite`) on random YAML-able structures (mostly
near-valid suites with some fields mutated, so the entry checks are reached) and on random text and bytes; the
recipe loader (`config.load_yaml` into TrainConfig) on random mappings and text. Each either loads or raises the
project's own error class (a SafetypatchError), never anything else."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetypatch.config import load_yaml
from safetypatch.errors import ConfigError, SafetypatchError, SuiteError
from safetypatch.evals.suite import ENTRY_TYPES, SuiteRunConfig, load_suite, prepare
from safetypatch.training.config import TrainConfig

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = ["builtin_harmful", "builtin_benign", "xstest_safe", "file:x.jsonl", "safety", "kl", "mc", "gsm8k",
         "perplexity", "refusal_xstest", "none", "aim", "first", "shuffle", "letter", "text", "harmful", "benign",
         "refusal_rate", "xstest_3class", "a.jsonl", "lora", "cosine", "middle", "0-1", "up_proj"]
leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(WORDS)
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6) | st.sampled_from(["name", "optional"]) | st.integers(), inner, max_size=3), max_leaves=8)
ENTRY_KEYS = sorted({f.name for cls in ENTRY_TYPES.values() for f in fields(cls)} | {"type"})
GEN_KEYS = ["max_new_tokens", "batch_size", "do_sample", "temperature", "top_p", "seed", "bf16"]
GOOD_ENTRIES = [{"benchmark": "builtin_harmful", "limit": 3}, {"type": "kl", "benchmark": "builtin_benign"},
                {"type": "mc", "path": "mmlu/test"}, {"type": "gsm8k", "path": "g.jsonl"},
                {"type": "perplexity", "path": "t.json", "text_field": "output"},
                {"benchmark": "xstest_safe", "metric": "xstest_3class", "stratify_by": "type"},
                {"name": "att", "benchmark": "builtin_harmful", "attacks": ["none", "aim"]}]
# a valid entry with some fields replaced, added or removed
mutated_entry = st.tuples(st.sampled_from(GOOD_ENTRIES),
                          st.dictionaries(st.sampled_from(ENTRY_KEYS), value, max_size=2),
                          st.lists(st.sampled_from(ENTRY_KEYS), max_size=1)).map(
    lambda t: {**{k: v for k, v in t[0].items() if k not in t[2]}, **t[1]})
near_valid_suite = st.fixed_dictionaries(
    {"judges": st.sampled_from([["refusal_xstest"], ["refusal_gcg", "refusal_xstest"]]),
     "entries": st.lists(mutated_entry, min_size=1, max_size=3)},
    optional={"generation": st.dictionaries(st.sampled_from(GEN_KEYS), value, max_size=2), "name": value,
              "description": value})
any_suite = st.fixed_dictionaries({}, optional={
    "name": value, "description": value, "judges": value, "entries": value | st.lists(mutated_entry, max_size=2),
    "generation": value | st.dictionaries(st.sampled_from(GEN_KEYS) | st.integers(), value, max_size=3)}) | value
TRAIN_KEYS = [f.name for f in fields(TrainConfig)]
recipe = st.dictionaries(st.sampled_from(TRAIN_KEYS) | st.text(max_size=5) | st.integers(), value, max_size=5) | value
yaml_text = st.text(max_size=200, alphabet=st.characters(codec="utf-8") | st.sampled_from(":-[]{}&*!|>'\"%@#\n "))


def dump(path: Path, data: object) -> bool:
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        return False
    return True


def loads_or_own_error(call) -> object:
    try:
        return call()
    except SafetypatchError:
        return None


@FUZZ
@given(suite=near_valid_suite | any_suite)
def test_suite_loader_on_random_structures(tmp_path_factory, suite):
    d = tmp_path_factory.mktemp("suite")
    f = d / "s.yaml"
    if not dump(f, suite):
        return
    loaded = loads_or_own_error(lambda: load_suite(str(f)))
    if loaded is not None:  # a suite that loads also prepares: missing files are notes, bad files own errors
        loads_or_own_error(lambda: prepare(loaded, SuiteRunConfig(suite=str(f), data_root=str(d)), []))


@FUZZ
@given(text=yaml_text | st.binary(max_size=200))
def test_suite_and_recipe_loaders_on_random_text(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("text") / "t.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    loads_or_own_error(lambda: load_suite(str(f)))
    loads_or_own_error(lambda: load_yaml(TrainConfig, f))


@FUZZ
@given(data=recipe)
def test_recipe_loader_on_random_mappings(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("recipe") / "r.yaml"
    if dump(f, data):
        loads_or_own_error(lambda: load_yaml(TrainConfig, f))


# YAML that parses but that Python cannot build into values, or text that is no characters
HARD_YAML = {
    "bad date": "seed: 2020-13-45\n",
    "deep nesting": "layers: " + "[" * 1500 + "]" * 1500 + "\n",
    "huge integer": "seed: " + "9" * 5000 + "\n",
    "surrogate escape": 'model: "x\\ud800"\n',
}


@pytest.mark.parametrize("name", sorted(HARD_YAML))
def test_suite_loader_on_yaml_python_cannot_build(tmp_path, name):
    f = tmp_path / "s.yaml"
    f.write_text("entries:\n  - {benchmark: builtin_harmful}\n" + HARD_YAML[name])
    with pytest.raises(SuiteError, match=r"s\.yaml: (not usable YAML|holds the escape)"):
        load_suite(str(f))


@pytest.mark.parametrize("name", sorted(HARD_YAML))
def test_recipe_loader_on_yaml_python_cannot_build(tmp_path, name):
    f = tmp_path / "r.yaml"
    f.write_text(HARD_YAML[name])
    with pytest.raises(ConfigError, match=r"r\.yaml"):
        load_yaml(TrainConfig, f)


@pytest.mark.parametrize("text,match", [
    ("1: x\nentries:\n  - {benchmark: builtin_harmful}\n", r"unknown top-level field\(s\) \['1'\]"),
    ("entries:\n  - {benchmark: builtin_harmful, 2: x, y: 1}\n", r"entry 1 \(builtin_harmful\): unknown field\(s\) "
                                                                 r"\['2', 'y'\]"),
    ("generation: {1: 2}\nentries:\n  - {benchmark: builtin_harmful}\n", r"field 'generation' must be a mapping"),
    ("generation: {temperature: 1" + "0" * 400 + "}\nentries:\n  - {benchmark: builtin_harmful}\n",
     r"generation: .*temperature"),
])
def test_suite_keys_that_are_not_names(tmp_path, text, match):
    """Keys YAML reads as numbers (found by the fuzzer: a sort of mixed key types, a str method on an int)."""
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(SuiteError, match=match):
        load_suite(str(f))
