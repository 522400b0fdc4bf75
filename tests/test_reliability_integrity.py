"""Every read path checks integrity (issue 16): patch.json's shape is checked by the loader (valid JSON of the wrong
shape is a PatchError naming the field, in info, eval, scale, export and merge); `patch info` and `analyze --patch`
check the sha256 (`patch info --no-verify` skips it and says so); truncated, one-byte-edited and pickle-carrying
patches are refused by both; a damaged adapter_config.json is reported as damaged."""

from __future__ import annotations

import json

import pytest

from safetypatch.cli import main
from safetypatch.errors import PatchError
from safetypatch.modeling.loading import load_model
from safetypatch.patches import load_patch, read_adapter, read_meta


def _edit_meta(patch, change):
    meta = json.loads((patch / "patch.json").read_text())
    meta = change(meta)
    (patch / "patch.json").write_text(json.dumps(meta))


WRONG_SHAPES = [  # (change to a good patch.json, the field the error must name)
    (lambda m: [m], "must hold a JSON object"),
    (lambda m: {**m, "weights": "abc"}, "field 'weights' must be an object"),
    (lambda m: {**m, "weights": {"sha256": 5}}, "field 'weights.sha256' must be 64 hex digits"),
    (lambda m: {k: v for k, v in m.items() if k != "weights"}, "no field 'weights'"),
    (lambda m: {**m, "base_model": 7}, "field 'base_model' must be an object"),
    (lambda m: {**m, "base_model": {**m["base_model"], "fingerprint": ["x"]}}, "field 'base_model.fingerprint'"),
    (lambda m: {**m, "evaluations": {"a": 1}}, "field 'evaluations' must be a list"),
    (lambda m: {**m, "evaluations": [{"refusal": {"patched": "high"}}]}, "field 'evaluations[0].refusal.patched'"),
    (lambda m: {**m, "calibration": {"curve": 3}}, "field 'calibration.curve'"),
    (lambda m: {**m, "shape": {"rank": -1}}, "field 'shape.rank' must be an integer >= 1"),
]


@pytest.mark.parametrize("change,field", WRONG_SHAPES)
def test_patch_json_of_the_wrong_shape_names_the_field(tiny_model_dir, tiny_patch, tmp_path, capsys, change, field):
    _edit_meta(tiny_patch, change)
    with pytest.raises(PatchError, match=field.replace("[", r"\[").replace("]", r"\]")):
        read_meta(tiny_patch)
    model, _ = load_model(str(tiny_model_dir))
    with pytest.raises(PatchError, match="patch.json"):
        load_patch(model, tiny_patch)  # what eval, chat and calibrate load a patch with
    p, m = str(tiny_patch), str(tiny_model_dir)
    for args in (["patch", "info", p], ["patch", "scale", p, "--factor", "2", "-o", str(tmp_path / "s")],
                 ["patch", "export", p, "--format", "peft", "-o", str(tmp_path / "e")],
                 ["patch", "merge", p, "--model", m, "-o", str(tmp_path / "m")]):
        assert main(args) == 2, args
    err = capsys.readouterr().err
    assert err.count("error: ") == 4 and err.count(field) == 4, err
    assert sorted(x.name for x in tmp_path.iterdir() if x.name in ("s", "e", "m")) == []


def _truncate(patch):
    w = patch / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-40])


def _edit_one_byte(patch):
    w = patch / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01
    w.write_bytes(bytes(data))


def _add_pickle(patch):
    (patch / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


@pytest.mark.parametrize("damage,why", [(_truncate, "sha256"), (_edit_one_byte, "sha256"), (_add_pickle, "pickle")])
def test_info_and_analyze_refuse_damaged_patches(tiny_model_dir, tiny_patch, tmp_path, capsys, damage, why):
    recorded = json.loads((tiny_patch / "patch.json").read_text())["weights"]["sha256"]
    damage(tiny_patch)
    assert main(["patch", "info", str(tiny_patch)]) == 2
    assert main(["patch", "info", "--json", str(tiny_patch)]) == 2
    assert main(["analyze", "--model", str(tiny_model_dir), "--patch", str(tiny_patch), "--no-shift", "--k", "1",
                 "--out", str(tmp_path / "geo")]) == 2
    captured = capsys.readouterr()
    assert recorded not in captured.out and captured.err.count("error: ") == 3 and captured.err.count(why) >= 3
    assert not (tmp_path / "geo").exists()


def test_info_no_verify_skips_the_check_and_says_so(tiny_patch, capsys):
    _edit_one_byte(tiny_patch)
    assert main(["patch", "info", "--no-verify", str(tiny_patch)]) == 0
    assert "NOT verified" in capsys.readouterr().out
    assert main(["patch", "info", "--no-verify", "--json", str(tiny_patch)]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is False


def test_analyze_no_verify_skips_the_check_and_says_so(tiny_model_dir, tiny_patch, capsys):
    _edit_one_byte(tiny_patch)
    argv = ["analyze", "--model", str(tiny_model_dir), "--patch", str(tiny_patch), "--no-shift", "--k", "1"]
    assert main(argv) == 2
    assert main([*argv, "--no-verify"]) == 0
    assert "was NOT verified (--no-verify)" in capsys.readouterr().out


def test_info_of_a_good_patch_is_verified(tiny_patch, capsys):
    assert main(["patch", "info", "--json", str(tiny_patch)]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    assert main(["patch", "info", str(tiny_patch)]) == 0
    assert "NOT verified" not in capsys.readouterr().out


DAMAGED_CONFIGS = [  # (adapter_config.json text, what the error must say)
    ('{"r": 1, "lora_alpha": 8', "damaged"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ('"a string"', "must hold a JSON object"),
    (lambda c: {**c, "r": "four"}, "field 'r' must be an integer >= 1"),
    (lambda c: {**c, "r": 3}, "adapter_config says rank 3 but lora_A has 1 rows"),
    (lambda c: {**c, "lora_alpha": float("nan")}, "field 'lora_alpha' must be a finite number"),
    (lambda c: {**c, "target_modules": 12}, "field 'target_modules'"),
    (lambda c: {**c, "rank_pattern": {"(": 2}}, "not a regular expression"),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, "no field 'r'"),
]


@pytest.mark.parametrize("content,message", DAMAGED_CONFIGS)
def test_a_damaged_adapter_config_is_reported_as_damaged(tiny_model_dir, tiny_patch, capsys, content, message):
    path = tiny_patch / "adapter_config.json"
    if callable(content):
        content = json.dumps(content(json.loads(path.read_text())))
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    model, _ = load_model(str(tiny_model_dir))
    for verify in (True, False):
        with pytest.raises(PatchError, match=message.replace("(", r"\(")) as e:
            load_patch(model, tiny_patch, verify=verify)
        assert "rank or shape mismatch" not in str(e.value) and "adapter_config" in str(e.value)
    with pytest.raises(PatchError, match=message.replace("(", r"\(")):
        read_adapter(tiny_patch)
