"""Issue 16: a missing local path is reported as missing at once, not tried as a hub id, unless it looks like
`org/name` (and nothing about it says "local": a leading `.`, `/`, `~`, a file suffix, a first component that is a
directory here). The same rule for data (`--data`, `--prompts`, `--benign`) and `--model`."""

import time

import pytest

from safetypatch.cli import main
from safetypatch.data import resolve_prompts
from safetypatch.data.paths import DATA_SUFFIXES, MODEL_SUFFIXES, looks_like_hub_id
from safetypatch.data.readers import iter_rows
from safetypatch.errors import DataError, ModelError
from safetypatch.modeling.loading import resolve_model


@pytest.fixture()
def in_project(tmp_path, monkeypatch):
    """A working directory with a `data/` and a `models/` folder, as a user's project has."""
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("spec", ["data/nope", "data/nope:train", "./nope", "../nope/x", "/abs/nope", "~/nope",
                                  "org/file.jsonl", "org/file.csv", "a/b/c", "nope"])
def test_missing_local_data_is_reported_missing(in_project, spec):
    with pytest.raises(DataError, match="no such file"):
        iter_rows(spec)


def test_missing_data_under_an_existing_folder_says_why(in_project):
    with pytest.raises(DataError, match=r"data/nope: no such file \(the folder 'data' exists here, so this is read "
                                        r"as a local path\); check the path, or give a hub dataset id"):
        resolve_prompts("data/nope")


@pytest.mark.parametrize("spec", ["org/name", "org/name:test", "teknium/OpenHermes-2.5", "HuggingFaceH4/ultrachat_200k"])
def test_hub_dataset_ids_are_still_hub_ids(in_project, spec):
    assert iter_rows(spec)[0] == spec  # the hub is only contacted when the rows are read
    assert looks_like_hub_id(spec, DATA_SUFFIXES, split=True)


@pytest.mark.parametrize("spec", ["models/nope", "./nope", "/abs/nope", "~/nope", "org/model.safetensors",
                                  "org/model.bin", "a/b/c", "nope"])
def test_missing_local_model_is_reported_missing(in_project, spec):
    with pytest.raises(ModelError, match="no such directory or file"):
        resolve_model(spec)


def test_missing_model_under_an_existing_folder_says_why(in_project):
    with pytest.raises(ModelError, match=r"--model models/nope: no such directory or file \(the folder 'models' "
                                         r"exists here"):
        resolve_model("models/nope")
    with pytest.raises(ModelError, match=r"--model models/x\.gguf: no such \.gguf file \(the folder 'models'"):
        resolve_model("models/x.gguf")


@pytest.mark.parametrize("spec", ["Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_model_ids_are_still_hub_ids(in_project, spec):
    assert resolve_model(spec) == ("hub", spec)
    assert looks_like_hub_id(spec, MODEL_SUFFIXES)


def test_names_the_os_cannot_look_up_are_missing_not_oserrors(in_project):
    long = "x" * 5000
    with pytest.raises(DataError, match="no such file"):
        iter_rows(long)
    with pytest.raises(DataError, match="no such file"):
        resolve_prompts(long + "+builtin")
    with pytest.raises(ModelError, match="no such directory or file"):
        resolve_model(long)


def test_cli_train_and_eval_report_a_missing_local_path_at_once(in_project, tiny_model_dir, capsys):
    t0 = time.time()
    rc = main(["train", "--model", str(tiny_model_dir), "--data", "data/nope", "--out", "run", "--bf16", "no"])
    assert rc == 2 and "data/nope: no such file (the folder 'data' exists here" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tiny_model_dir), "--prompts", "data/nope.jsonl", "--out", "ev"])
    assert rc == 2 and "data/nope.jsonl: no such file" in capsys.readouterr().err
    rc = main(["eval", "--model", "models/nope", "--prompts", "builtin:harmful:test", "--out", "ev2"])
    assert rc == 2 and "--model models/nope: no such directory or file" in capsys.readouterr().err
    assert time.time() - t0 < 20  # no hub retries
