"""Issue 16: every user text file is read as UTF-8 with or without a BOM; a file that is not UTF-8 (or JSON that is
no text) is an error naming the file, the line and the encoding, never a UnicodeDecodeError traceback."""

import json

import pytest

from support import write_jsonl
from safetypatch.cli import main
from safetypatch.data import read_records
from safetypatch.data.text import read_text
from safetypatch.errors import DataError, SuiteError
from safetypatch.evals.benchmarks import load_benchmark
from safetypatch.evals.suite import load_suite
from safetypatch.evals.utility import load_gsm8k, load_mc_jsonl, load_mmlu, load_texts

BOM = b"\xef\xbb\xbf"
NOT_UTF8 = r"{name}:{line}: not UTF-8 text \(byte 0x{byte} at column {col} .*save the file as UTF-8"


def not_utf8(name: str, line: int, byte: str, col: int) -> str:
    return NOT_UTF8.format(name=name.replace(".", r"\."), line=line, byte=byte, col=col)


# ----------------------------------------------------------------------------------------- a BOM is accepted
@pytest.mark.parametrize("name,content", [
    ("d.csv", "prompt,response\nhello there,sure\n"),
    ("d.tsv", "prompt\tresponse\nhello there\tsure\n"),
    ("d.jsonl", '{"prompt": "hello there", "response": "sure"}\n'),
    ("d.json", '[{"prompt": "hello there", "response": "sure"}]'),
])
def test_data_readers_accept_a_bom(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(BOM + content.encode())
    rec = read_records(f)
    assert [(r.prompt, r.response) for r in rec] == [("hello there", "sure")]


def test_tsv_is_read_tab_separated(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("prompt\tcategory\nhello, there\tx\n")
    rec = read_records(f)[0]
    assert rec.prompt == "hello, there" and rec.meta == {"category": "x"}


def test_utility_and_benchmark_readers_accept_a_bom(tmp_path):
    (tmp_path / "a_test.csv").write_bytes(BOM + b"What is 1+1?,1,2,3,4,B\n")
    assert load_mmlu(tmp_path / "a_test.csv")[0].question == "What is 1+1?"
    (tmp_path / "g.jsonl").write_bytes(BOM + b'{"question": "q", "answer": "so #### 4"}\n')
    assert load_gsm8k(tmp_path / "g.jsonl")[0].gold == "4"
    (tmp_path / "m.jsonl").write_bytes(BOM + b'{"question": "q", "choices": ["a", "b"], "answer": 1}\n')
    assert load_mc_jsonl(tmp_path / "m.jsonl")[0].answer == 1
    (tmp_path / "t.txt").write_bytes(BOM + b"first text\nsecond\n")
    assert load_texts(tmp_path / "t.txt") == ["first text", "second"]
    (tmp_path / "adv.csv").write_bytes(BOM + b"goal,target\nDo a bad thing,Sure\n")
    assert load_benchmark("advbench", path=tmp_path / "adv.csv")[0].prompt == "Do a bad thing"
    (tmp_path / "mi.txt").write_bytes(BOM + b"How to do a bad thing?\n")
    assert load_benchmark("malicious_instruct", path=tmp_path / "mi.txt")[0].prompt == "How to do a bad thing?"


def test_suite_yaml_with_a_bom(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_bytes(BOM + b"name: bommed\nentries:\n  - {benchmark: builtin_harmful, limit: 2}\n")
    assert load_suite(str(f)).name == "bommed"


# ----------------------------------------------------------------------------------------- not UTF-8
LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9"


@pytest.mark.parametrize("name,content,line,col", [
    ("d.jsonl", b'{"prompt": "a"}\n{"prompt": "' + LATIN1 + b'"}\n', 2, 16),
    ("d.json", b'[{"prompt": "a"},\n {"prompt": "' + LATIN1 + b'"}]', 2, 17),
    ("d.csv", b"prompt\nok\n" + LATIN1 + b"\n", 3, 4),
    ("d.tsv", b"prompt\n" + LATIN1 + b"\n", 2, 4),
    ("d.csv", BOM + b"prompt\n" + LATIN1 + b"\n", 2, 4),
])
def test_data_readers_name_file_line_and_encoding(tmp_path, name, content, line, col):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError, match=not_utf8(name, line, "e9", col)):
        read_records(f)


def test_utf16_file_is_named_as_such(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes("prompt\nhello\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"d\.csv:1: the file is UTF-16 .*save it as UTF-8"):
        read_records(f)


def test_utility_and_benchmark_readers_name_file_line_and_encoding(tmp_path):
    (tmp_path / "a_test.csv").write_bytes(b"q,1,2,3,4,A\n" + LATIN1 + b",1,2,3,4,A\n")
    with pytest.raises(DataError, match=not_utf8("a_test.csv", 2, "e9", 4)):
        load_mmlu(tmp_path / "a_test.csv")
    (tmp_path / "g.jsonl").write_bytes(b'{"question": "' + LATIN1 + b'", "answer": "#### 4"}\n')
    with pytest.raises(DataError, match=not_utf8("g.jsonl", 1, "e9", 18)):
        load_gsm8k(tmp_path / "g.jsonl")
    (tmp_path / "m.jsonl").write_bytes(b'\n\n{"question": "' + LATIN1 + b'"}\n')
    with pytest.raises(DataError, match=not_utf8("m.jsonl", 3, "e9", 18)):
        load_mc_jsonl(tmp_path / "m.jsonl")
    (tmp_path / "t.txt").write_bytes(b"fine\n" + LATIN1 + b"\n")
    with pytest.raises(DataError, match=not_utf8("t.txt", 2, "e9", 4)):
        load_texts(tmp_path / "t.txt")
    (tmp_path / "adv.csv").write_bytes(b"goal,target\n" + LATIN1 + b",x\n")
    with pytest.raises(DataError, match=not_utf8("adv.csv", 2, "e9", 4)):
        load_benchmark("advbench", path=tmp_path / "adv.csv")
    (tmp_path / "mi.txt").write_bytes(LATIN1 + b"\n")
    with pytest.raises(DataError, match=not_utf8("mi.txt", 1, "e9", 4)):
        load_benchmark("malicious_instruct", path=tmp_path / "mi.txt")


def test_suite_yaml_not_utf8(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_bytes(b"name: x\ndescription: " + LATIN1 + b"\nentries: []\n")
    with pytest.raises(SuiteError, match=not_utf8("s.yaml", 2, "e9", 17)):
        load_suite(str(f))


def test_read_text_names_a_directory_and_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_text(tmp_path)
    with pytest.raises(SuiteError, match="nope.yaml: no such file"):
        read_text(tmp_path / "nope.yaml", SuiteError)


# ----------------------------------------------------------------------------------------- JSON that is no text
@pytest.mark.parametrize("name,content,match", [
    ("d.jsonl", '{"prompt": "a\\ud800b"}\n', r"d\.jsonl:1: holds the escape \\ud800, an unpaired surrogate"),
    ("d.json", '[{"prompt": "ok"}, {"prompt": "x", "id": "\\udfff"}]', r"d\.json: holds the escape \\udfff"),
    ("d.jsonl", '{"prompt": "a", "n": ' + "1" * 5000 + "}\n", r"d\.jsonl:1: not usable JSON \(Exceeds the limit"),
    ("d.jsonl", '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n", r"d\.jsonl:1: not usable JSON \(nested too deeply"),
    ("d.json", "[" * 100000 + "]" * 100000, r"d\.json: not usable JSON \(nested too deeply"),
])
def test_json_that_is_no_text_is_a_data_error(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(f)


def test_surrogate_in_a_messages_cell(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('messages\n"[{""role"": ""user"", ""content"": ""\\ud800""}]"\n')
    with pytest.raises(DataError, match=r"d\.csv:2: field 'messages': holds the escape \\ud800"):
        read_records(f)


def test_paired_surrogate_escapes_are_one_character(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "smile \ud83d\ude00"}])  # json.dumps writes the escaped pair
    assert "\\ud83d\\ude00" in f.read_text()
    assert read_records(f)[0].prompt == "smile \U0001F600"


def test_suite_yaml_surrogate_escape(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text('entries:\n  - {benchmark: builtin_harmful, name: "x\\ud800"}\n')
    with pytest.raises(SuiteError, match=r"s\.yaml: holds the escape \\ud800"):
        load_suite(str(f))


# ----------------------------------------------------------------------------------------- CSV shape
def test_csv_row_with_more_fields_than_the_header(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,response\nHow do I cook rice, quickly?,Boil it\n")  # unquoted comma: the prompt was cut
    with pytest.raises(DataError, match=r"d\.csv:2: 3 fields but the header names 2; quote a field that holds a ','"):
        read_records(f)


def test_csv_field_over_the_limit_or_unclosed_quote(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt\nok\n"' + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"d\.csv:\d+: not readable as CSV \(field larger than field limit"):
        read_records(f)


def test_damaged_parquet(tmp_path):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        read_records(f)


# ----------------------------------------------------------------------------------------- through the CLI
def test_cli_eval_non_utf8_prompts_and_bom_csv(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prompt": "hello"}\n{"prompt": "' + LATIN1 + b'"}\n')
    rc = main(["eval", "--model", str(tiny_model_dir), "--prompts", str(bad), "--out", str(tmp_path / "e1"),
               "--max-new-tokens", "2"])
    assert rc == 2
    assert capsys.readouterr().err.strip().endswith("p.jsonl:2: not UTF-8 text (byte 0xe9 at column 16 is not "
                                                     "valid UTF-8); save the file as UTF-8 (with or without a BOM)")
    bom = tmp_path / "p.csv"
    bom.write_bytes(BOM + b"prompt,category\nhello there,x\nhow are you,y\n")
    rc = main(["eval", "--model", str(tiny_model_dir), "--prompts", str(bom), "--out", str(tmp_path / "e2"),
               "--max-new-tokens", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "e2" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "how are you"] and rows[0]["category"] == "x"


def test_cli_train_non_utf8_data_and_bom_csv(tiny_model_dir, benign_file, tmp_path, capsys):
    flags = ["--model", str(tiny_model_dir), "--benign", str(benign_file), "--epochs", "1", "--batch-size", "2",
             "--layers", "0-1", "--dev-size", "2", "--dev-tokens", "2", "--anchor-tokens", "2", "--bf16", "no",
             "--rank", "1", "--eval-every", "0"]
    bad = tmp_path / "h.csv"
    bad.write_bytes(b"prompt,response\nhow to make a weapon,Sorry\n" + LATIN1 + b",Sorry\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "t1")] + flags) == 2
    assert "h.csv:3: not UTF-8 text (byte 0xe9 at column 4" in capsys.readouterr().err
    bom = tmp_path / "h2.csv"
    bom.write_bytes(BOM + b"prompt,response\n" + b"".join(b"how to make weapon %d,Sorry I can't\n" % i
                                                          for i in range(4)))
    assert main(["train", "--data", str(bom), "--out", str(tmp_path / "t2")] + flags) == 0
    meta = json.loads((tmp_path / "t2" / "patch" / "patch.json").read_text())
    assert meta["data"]["refusal"]["n"] == 4
