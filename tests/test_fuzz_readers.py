"""Fuzzing the data readers (issue 16): random bytes, random JSON of any shape and random CSV text, in .jsonl /
.json / .csv / .tsv / .txt / .parquet files, through every reader of user data (`read_records`, the utility loaders
for MMLU, multiple choice, GSM8K and perplexity texts, the benchmark loaders). Each either loads or raises the
project's own error class (a SafetypatchError), never anything else."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetypatch.data import read_records
from safetypatch.errors import SafetypatchError
from safetypatch.evals.benchmarks import load_benchmark
from safetypatch.evals.utility import load_gsm8k, load_mc_jsonl, load_mmlu, load_texts

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet"]
CSV_BENCHMARKS = ["advbench", "harmbench", "jbb_harmful", "strongreject", "xstest_safe"]
FIELDS = ["prompt", "response", "messages", "question", "choices", "answer", "answerKey", "text", "id", "role",
          "content", "label", "goal", "category"]

leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "text", "label"]),
                                    st.sampled_from(["user", "assistant", "system"]) | json_value, max_size=3),
                    max_size=3)
row = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_value | messages, max_size=5)
# JSON escapes a generator of str does not produce: unpaired surrogates, huge integers, deep nesting
raw_json = st.sampled_from(['{"prompt": "\\ud800"}', '{"prompt": "x", "n": ' + "7" * 4400 + "}",
                            '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}", '{"prompt": NaN}', "[]", "{}", "null"])


def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def writable(records: list) -> None:
    """What a reader loaded can be written as UTF-8 (a sample row) and tokenized: no unpaired surrogate in it."""
    json.dumps([dataclasses.asdict(r) for r in records], ensure_ascii=False).encode("utf-8")


def every_reader(path: Path) -> None:
    """Run each reader of user data on `path`: it loads, or raises a SafetypatchError (anything else fails)."""
    calls = [lambda: writable(read_records(path)), lambda: read_records(path, require_response=True),
             lambda: writable(read_records(path, prompt_field="question", response_field="answer")),
             lambda: load_texts(path), lambda: writable(load_mc_jsonl(path)), lambda: load_gsm8k(path)]
    if path.suffix == ".csv":
        calls.append(lambda: load_mmlu(path))
        calls += [lambda b=b: load_benchmark(b, path=path) for b in CSV_BENCHMARKS]
    if path.suffix == ".txt":
        calls.append(lambda: load_benchmark("malicious_instruct", path=path))
    for call in calls:
        try:
            call()
        except SafetypatchError:
            pass


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES), bom=st.booleans())
def test_random_bytes(tmp_path_factory, data, suffix, bom):
    f = fuzz_file(tmp_path_factory) / f"d{suffix}"
    f.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    every_reader(f)


@FUZZ
@given(value=json_value | st.lists(row, max_size=4) | row, ascii_only=st.booleans(), bom=st.booleans())
def test_random_json_any_shape(tmp_path_factory, value, ascii_only, bom):
    d = fuzz_file(tmp_path_factory)
    prefix = "\ufeff" if bom else ""
    (d / "d.json").write_text(prefix + json.dumps(value, ensure_ascii=ascii_only), encoding="utf-8")
    every_reader(d / "d.json")
    rows = value if isinstance(value, list) else [value]
    (d / "d.jsonl").write_text(prefix + "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows),
                               encoding="utf-8")
    every_reader(d / "d.jsonl")


@FUZZ
@given(lines=st.lists(raw_json | row.map(json.dumps), min_size=1, max_size=3))
def test_json_no_generator_writes(tmp_path_factory, lines):
    d = fuzz_file(tmp_path_factory)
    (d / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    every_reader(d / "d.jsonl")
    (d / "d.json").write_text("[" + ",".join(lines) + "]", encoding="utf-8")
    every_reader(d / "d.json")


@FUZZ
@given(header=st.sampled_from(["prompt,response", "question,A,B,C,D,answer", "goal,target", "messages", "", "x"]),
       rows=st.lists(st.lists(st.text(max_size=12) | st.sampled_from(FIELDS), max_size=7), max_size=5),
       bom=st.booleans(), tab=st.booleans())
def test_random_csv(tmp_path_factory, header, rows, bom, tab):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if tab else ",")
    if header:
        w.writerow(header.split(","))
    w.writerows(rows)
    f = fuzz_file(tmp_path_factory) / ("d.tsv" if tab else "d.csv")
    f.write_text(("\ufeff" if bom else "") + buf.getvalue(), encoding="utf-8")
    every_reader(f)


@FUZZ
@given(text=st.text(max_size=200, alphabet=st.characters(codec="utf-8") | st.sampled_from('",\t\n\r{}[]:\\')),
       suffix=st.sampled_from(SUFFIXES[:5]))
def test_random_text(tmp_path_factory, text, suffix):
    f = fuzz_file(tmp_path_factory) / f"t{suffix}"
    f.write_text(text, encoding="utf-8")
    every_reader(f)
