import json

import pytest

from support import SHARED, write_jsonl
from safetypatch.errors import DataError
from safetypatch.data import builtin_split, load_builtin, read_records
from safetypatch.data.builtin import SPLITS
from safetypatch.judges import XSTEST_REFUSAL_PREFIXES


def test_jsonl_missing_field_names_file_line_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"question": "c", "response": "d"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'prompt'.*question"):
        read_records(f)


@pytest.mark.parametrize("text,match,require_response", [
    ('{"prompt": "a"}\n\n{"prompt": oops}\n', r"d\.jsonl:3: not valid JSON", False),
    ('{"prompt": "a", "response": ""}\n', r"d\.jsonl:1: field 'response' is empty", True),
    ('{"prompt": "a", "response": 3}\n', r"d\.jsonl:1: field 'response' is empty or not text", False),
    ('{"prompt": "a"}\n', r"d\.jsonl:1: missing field 'response'", True),
])
def test_jsonl_bad_json_and_empty_field(tmp_path, text, match, require_response):
    f = tmp_path / "d.jsonl"
    f.write_text(text)
    with pytest.raises(DataError, match=match):
        read_records(f, require_response=require_response)


def test_empty_file(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match="no rows"):
        read_records(f)


def test_csv_field_mapping_and_line_numbers(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('goal,target\n"multi\nline goal",ok\nsecond,\n')
    recs = read_records(f, prompt_field="goal", response_field="target")
    assert recs[0].prompt == "multi\nline goal" and recs[0].response == "ok"
    with pytest.raises(DataError, match=r"d\.csv:4: field 'target' is empty"):
        read_records(f, prompt_field="goal", response_field="target", require_response=True)
    with pytest.raises(DataError, match=r"d\.csv:3: missing field 'prompt'"):
        read_records(f)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["hi", "there"], "output": ["a", "b"]}), f)
    recs = read_records(f, prompt_field="instruction", response_field="output")
    assert [r.response for r in recs] == ["a", "b"]


def test_messages_rows(tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'messages\[0\]'"):
        read_records(f)
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    r = read_records(f, require_response=True)[0]
    assert r.response == "a" and r.chat() == msgs[:2]


def test_unknown_source():
    with pytest.raises(DataError, match="no such file"):
        read_records("does/not/exist.jsonl")


def test_builtin_sizes_and_categories():
    harmful, benign = load_builtin("harmful"), load_builtin("benign")
    assert len(harmful) >= 300 and len(benign) >= 300
    assert len({r.meta["category"] for r in harmful}) >= 10
    kinds = {r.meta["kind"] for r in benign}
    assert kinds == {"ordinary", "lookalike"}
    assert len({r.prompt for r in harmful}) == len(harmful)
    assert len({r.prompt.lower() for r in harmful} & {r.prompt.lower() for r in benign}) == 0
    for r in harmful:
        assert r.response and r.response.lower().startswith(XSTEST_REFUSAL_PREFIXES), r.meta["id"]
        assert len(r.response.split()) <= 60


def test_benign_extra_is_new():
    extra, benign = load_builtin("benign_extra"), load_builtin("benign")
    assert len(extra) >= 150 and {r.meta["kind"] for r in extra} == {"lookalike", "ordinary"}
    assert len({r.meta["category"] for r in extra}) >= 10
    assert not {r.prompt.lower() for r in extra} & {r.prompt.lower() for r in benign + load_builtin("harmful")}


def test_extra_sets_are_new_and_well_formed():
    from safetypatch.data.builtin import BUILTIN_SETS

    seen: dict[str, str] = {}
    for name in BUILTIN_SETS:  # no prompt appears twice across all built-in sets
        for r in load_builtin(name):
            key = " ".join(r.prompt.lower().split())
            assert key not in seen, f"{name}/{r.meta.get('id')} repeats {seen.get(key)}"
            seen[key] = f"{name}/{r.meta.get('id')}"
    for name, least in (("harmful_extra", 200), ("harmful_blunt", 120)):
        records = load_builtin(name)
        assert len(records) >= least and len({r.meta["category"] for r in records}) == 12
        for r in records:
            assert r.response and r.response.lower().startswith(XSTEST_REFUSAL_PREFIXES + ("i won't", "i will not")), \
                r.meta["id"]
    assert max(len(r.prompt.split()) for r in load_builtin("harmful_blunt")) <= 16  # short and blunt
    assert {r.meta["kind"] for r in load_builtin("lookalike_extra")} == {"lookalike"}


def test_plus_joins_sources():
    from safetypatch.data.builtin import resolve_prompts

    joined = resolve_prompts("builtin:benign:dev+builtin:benign_extra:dev")
    assert [r.prompt for r in joined] == ([r.prompt for r in builtin_split("benign", "dev")]
                                          + [r.prompt for r in builtin_split("benign_extra", "dev")])


def test_builtin_splits_disjoint_and_fixed():
    from safetypatch.data.builtin import BUILTIN_SETS

    for name in BUILTIN_SETS:
        parts = {s: [r.prompt for r in builtin_split(name, s)] for s in SPLITS}
        assert sum(map(len, parts.values())) == len(load_builtin(name))
        assert not set(parts["train"]) & set(parts["dev"])
        assert not set(parts["train"]) & set(parts["test"])
        assert not set(parts["dev"]) & set(parts["test"])
        assert parts["test"] == [r.prompt for r in builtin_split(name, "test")]  # deterministic
    assert [r.prompt for r in builtin_split("harmful", "test", seed=1)] != [r.prompt for r in builtin_split("harmful", "test")]


def test_builtin_is_not_copied_from_shared_benchmarks():
    """Our data is written by us: no built-in prompt appears verbatim in the public sets under ../shared."""
    if not SHARED.exists():
        pytest.skip("../shared/data not present")
    ours = {r.prompt.strip().lower() for n in ("harmful", "benign", "benign_extra") for r in load_builtin(n)}
    theirs = set()
    import csv

    for path, col in [("advbench/harmful_behaviors.csv", "goal"), ("jbb/harmful-behaviors.csv", "goal"),
                      ("jbb/benign-behaviors.csv", "goal"), ("xstest/xstest_prompts.csv", "prompt")]:
        p = SHARED / path
        if p.exists():
            with open(p, newline="", encoding="utf-8") as f:
                theirs |= {row[col].strip().lower() for row in csv.DictReader(f)}
    for p in ("refusal_direction/harmful_train.json", "refusal_direction/harmful_val.json"):
        if (SHARED / p).exists():
            theirs |= {r["instruction"].strip().lower() for r in json.loads((SHARED / p).read_text())}
    assert not ours & theirs
