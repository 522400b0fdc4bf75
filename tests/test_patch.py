import json

import pytest
import torch

from support import build_tiny_model
from safetypatch.config import PatchShape
from safetypatch.modeling import fingerprint
from safetypatch.errors import PatchError
from safetypatch.patches import attach_new_patch, load_patch, patch_info, save_patch, verify_files

SHAPE = PatchShape(rank=2, alpha=4.0, target_modules=["up_proj", "q_proj"], layers="1")


def _random_patch(tok, seed=0):
    model = attach_new_patch(build_tiny_model(tok), SHAPE, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def _ids(tok):
    return tok(["Write a poem about the sea", "How do I kill a Python process?"], return_tensors="pt", padding=True)


@pytest.fixture()
def saved_patch(tiny_tok, tmp_path):
    model = _random_patch(tiny_tok)
    save_patch(model, tmp_path / "patch", {"base_model": {"spec": "tiny"}, "shape": {"rank": 2}})
    return model, tmp_path / "patch"


def test_layer_selection_places_lora_only_there(tiny_tok):
    model = _random_patch(tiny_tok)
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names and all(".layers.1." in n for n in names)
    assert {n.split(".lora_A")[0].split(".")[-1] for n in names} == {"up_proj", "q_proj"}


def test_round_trip_through_plain_peft(tiny_tok, saved_patch):
    from peft import PeftModel

    model, path = saved_patch
    batch = _ids(tiny_tok)
    with torch.no_grad():
        want = model(**batch).logits
        plain = PeftModel.from_pretrained(build_tiny_model(tiny_tok), str(path))  # no safetypatch involved
        got = plain(**batch).logits
        checked = load_patch(build_tiny_model(tiny_tok), path)(**batch).logits
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(checked, want)
    meta = json.loads((path / "patch.json").read_text())
    assert meta["base_model"]["fingerprint"] == fingerprint(build_tiny_model(tiny_tok))
    assert patch_info(path)["sha256"] == meta["weights"]["sha256"]


def test_merge_matches_peft_output(tiny_tok, saved_patch):
    model, _ = saved_patch
    batch = _ids(tiny_tok)
    with torch.no_grad():
        want = model(**batch).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-4, atol=1e-5)


def test_edited_weights_refused(tiny_tok, saved_patch):
    _, path = saved_patch
    w = path / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="sha256.*truncated or edited"):
        load_patch(build_tiny_model(tiny_tok), path)
    w.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PatchError, match="sha256"):
        verify_files(path)


def test_other_base_model_refused(tiny_tok, saved_patch):
    _, path = saved_patch
    other = build_tiny_model(tiny_tok, seed=123)
    with pytest.raises(PatchError, match="another base model:\n  weights_sha256"):
        load_patch(other, path)
    deeper = build_tiny_model(tiny_tok, layers=3)
    with pytest.raises(PatchError, match="num_layers: patch was trained on 2, this model has 3"):
        load_patch(deeper, path)


def test_pickle_refused(tiny_tok, saved_patch):
    _, path = saved_patch
    (path / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(PatchError, match="pickle"):
        load_patch(build_tiny_model(tiny_tok), path)
    with pytest.raises(PatchError, match="pickle|safetensors"):
        load_patch(build_tiny_model(tiny_tok), path, verify=False)


def test_missing_patch_json_says_what_to_do(tiny_tok, saved_patch):
    """The error used to suggest an `--allow-unverified` flag that no command has."""
    _, path = saved_patch
    (path / "patch.json").unlink()
    with pytest.raises(PatchError) as e:
        verify_files(path)
    msg = str(e.value)
    assert "--allow-unverified" not in msg
    assert "no patch.json" in msg and "PeftModel.from_pretrained" in msg and "safetypatch train" in msg


def test_save_never_overwrites(tiny_tok, saved_patch):
    model, path = saved_patch
    with pytest.raises(FileExistsError):
        save_patch(model, path, {})
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".patch.")]  # no temp dirs left behind


def test_half_precision_save(tiny_tok, tmp_path):
    from safetensors.torch import load_file

    model = _random_patch(tiny_tok)
    save_patch(model, tmp_path / "p16", {}, save_dtype="float16")
    assert {t.dtype for t in load_file(tmp_path / "p16" / "adapter_model.safetensors").values()} == {torch.float16}
    loaded = load_patch(build_tiny_model(tiny_tok), tmp_path / "p16")
    batch = _ids(tiny_tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-2, atol=1e-2)


def test_certificate_recorded_without_touching_weights(tiny_tok, saved_patch, capsys):
    from safetypatch.cli import main
    from safetypatch.patches import record_evaluation

    _, path = saved_patch
    record_evaluation(path, {"suite": "builtin:harmful:test", "n": 3,
                             "refusal": {"base": {"refusal_xstest": 0.1}, "patched": {"refusal_xstest": 0.9}}})
    verify_files(path)  # sha256 of the weights still matches
    info = patch_info(path)
    assert info["evaluations"][0]["refusal"]["patched"]["refusal_xstest"] == 0.9 and info["evaluations"][0]["date"]
    assert main(["patch", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 evaluation(s)" in out and "builtin:harmful:test" in out and "90.0%" in out
    record_evaluation(path, {"suite": "suite:kl_only", "out": "runs/kl", "refusal": {}})  # a suite without refusal
    assert main(["patch", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "suite:kl_only  no refusal rate recorded (the report: runs/kl)" in out and "n=?" not in out


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from safetypatch.io_utils import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_fingerprint_covers_every_weight_matrix_and_old_patches_still_load(tiny_tok, saved_patch):
    """Version 2 sees a change in any weight matrix (version 1 hashed three of them); a patch that records a
    version-1 fingerprint is checked in version 1, and a version-1 and a version-2 record compare by shapes."""
    import json

    import torch

    from safetypatch.modeling import fingerprint, fingerprint_differences

    base = build_tiny_model(tiny_tok)
    changed = build_tiny_model(tiny_tok)
    names = sorted(n for n, p in changed.named_parameters() if p.ndim == 2)
    v1_probes = {names[0], names[len(names) // 2], names[-1]}
    target = next(n for n in names if n not in v1_probes and "layers.1." in n)
    with torch.no_grad():
        dict(changed.named_parameters())[target].add_(1e-3)  # like a merged patch on one middle layer
    assert fingerprint(changed, version=1) == fingerprint(base, version=1)  # what version 1 missed
    assert fingerprint_differences(fingerprint(base), fingerprint(changed)) == [
        f"weights_sha256: patch was trained on {fingerprint(base)['weights_sha256']!r}, this model has "
        f"{fingerprint(changed)['weights_sha256']!r}"]
    _, path = saved_patch
    with pytest.raises(PatchError, match="another base model:\n  weights_sha256"):
        load_patch(changed, path)
    # a patch recorded before version 2: checked in version 1 (and then blind to this change, as it always was)
    meta_file = path / "patch.json"
    meta = json.loads(meta_file.read_text())
    meta["base_model"]["fingerprint"] = fingerprint(base, version=1)
    meta_file.write_text(json.dumps(meta))
    load_patch(build_tiny_model(tiny_tok), path)
    assert fingerprint_differences(fingerprint(base, version=1), fingerprint(base)) == []
    assert fingerprint_differences(fingerprint(base, version=1), fingerprint(build_tiny_model(tiny_tok, layers=3)))
