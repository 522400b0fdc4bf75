"""CLI tests for `patch merge / unmerge`, `calibrate`, `chat`, `redteam` and the certificate in `patch info`:
exact round trips on the tiny model, and clear errors (no traceback) for a missing patch, a pickle file and a
patch made for another base model."""

import io
import json
import sys

import pytest
import torch

from support import build_tiny_model
from safetypatch.cli import main
from safetypatch.config import PatchShape
from safetypatch.modeling import fingerprint, load_model
from safetypatch.patches import attach_new_patch, delta_weights, save_patch, verify_files

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_patch(tok, path, modules=("up_proj",), base_seed=0, seed=0, std=0.3):
    """A saved patch with random A and B (PEFT's B = 0 init would hide mistakes) for the tiny model."""
    model = attach_new_patch(build_tiny_model(tok, seed=base_seed),
                             PatchShape(rank=2, alpha=4.0, target_modules=list(modules), layers="all"))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)
    save_patch(model, path, {"base_model": {"spec": "tiny"}})
    return path


def tensors(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


# ---------------------------------------------------------------------------------------------- merge / unmerge
def test_merge_unmerge_is_bit_exact_and_restores_the_fingerprint(tiny_tok, tiny_model_dir, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES)
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    assert main(["patch", "merge", "--model", str(tiny_model_dir), str(p), "-o", str(merged)]) == 0
    assert main(["patch", "unmerge", "--model", str(merged), str(p), "-o", str(restored)]) == 0
    assert "bit-exact" in capsys.readouterr().out
    base, m, r = tensors(tiny_model_dir), tensors(merged), tensors(restored)
    assert {k.rsplit(".", 2)[-2] for k in base if not torch.equal(base[k], m[k])} == set(ALL_MODULES)
    for k, dw in delta_weights(p).items():  # the merge added exactly dW (up to one rounding) ...
        torch.testing.assert_close(m[k + ".weight"], base[k + ".weight"] + dw, rtol=1e-6, atol=1e-6)
    assert set(r) == set(base) and all(torch.equal(r[k], base[k]) for k in base)  # ... and the unmerge took it back
    fp_base, fp_restored = (fingerprint(load_model(str(d))[0]) for d in (tiny_model_dir, restored))
    assert fp_restored == fp_base and fingerprint(load_model(str(merged))[0]) != fp_base
    info = json.loads((restored / "unmerged_from.json").read_text())
    assert info["exact"] and info["fingerprint_matches_patch_base"]
    corrections = json.loads((merged / "merged_from.json").read_text())["unmerge_corrections"]
    assert corrections["elements"] > 0  # float rounding really loses bits that the merge had to keep


def test_unmerge_of_a_model_merged_elsewhere_is_close_not_exact(tiny_tok, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES)
    elsewhere = tmp_path / "elsewhere"
    PeftModel.from_pretrained(build_tiny_model(tiny_tok), str(p)).merge_and_unload().save_pretrained(elsewhere)
    tiny_tok.save_pretrained(elsewhere)
    assert main(["patch", "unmerge", "--model", str(elsewhere), str(p), "-o", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "up to float rounding" in out
    base, r = tensors(tiny_model_dir), tensors(tmp_path / "r")
    for k in base:
        torch.testing.assert_close(r[k], base[k], rtol=0, atol=1e-6)
    info = json.loads((tmp_path / "r" / "unmerged_from.json").read_text())
    assert not info["exact"] and info["fingerprint_matches_patch_base"] == ("does NOT match" not in out)


def test_unmerge_refuses_edited_corrections(tiny_tok, tiny_model_dir, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p", modules=ALL_MODULES)
    merged = tmp_path / "merged"
    assert main(["patch", "merge", "--model", str(tiny_model_dir), str(p), "-o", str(merged)]) == 0
    with open(merged / "safetypatch_unmerge" / "corrections.safetensors", "ab") as f:
        f.write(b"\0")
    assert main(["patch", "unmerge", "--model", str(merged), str(p), "-o", str(tmp_path / "r")]) == 2
    assert "sha256 does not match merged_from.json" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- clear errors
def _bad_patches(tiny_tok, tmp_path):
    pickled = make_patch(tiny_tok, tmp_path / "pickled")
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    return {"missing": (tmp_path / "nope", "no such patch directory"),
            "pickle": (pickled, "pickle file"),
            "other base": (make_patch(tiny_tok, tmp_path / "other", base_seed=1), "another base model")}


def _commands(model_dir, tmp_path, patch):
    dev = jsonl(tmp_path / "dev.jsonl", ["a question", "another question", "a third one"])
    return {
        "patch merge": ["patch", "merge", "--model", str(model_dir), str(patch), "-o", str(tmp_path / "m")],
        "calibrate": ["calibrate", "--patch", str(patch), "--model", str(model_dir), "--dev-harmful", dev,
                      "--dev-benign", dev, "--factors", "1", "--max-new-tokens", "2"],
        "chat": ["chat", "--model", str(model_dir), "--patch", str(patch), "--max-new-tokens", "2"],
        "redteam": ["redteam", "--patch", str(patch), "--model", str(model_dir), "--pool", dev, "--rounds", "1",
                    "--out", str(tmp_path / "rt"), "--attacks", "none"],
    }


@pytest.mark.parametrize("case", ["missing", "pickle", "other base"])
@pytest.mark.parametrize("command", ["patch merge", "calibrate", "chat", "redteam"])
def test_new_commands_give_clear_errors(tiny_tok, tiny_model_dir, tmp_path, capsys, monkeypatch, case, command):
    patch, message = _bad_patches(tiny_tok, tmp_path)[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(_commands(tiny_model_dir, tmp_path, patch)[command]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "pickle"])
def test_unmerge_gives_clear_errors(tiny_tok, tiny_model_dir, tmp_path, capsys, case):
    patch, message = _bad_patches(tiny_tok, tmp_path)[case]
    assert main(["patch", "unmerge", "--model", str(tiny_model_dir), str(patch), "-o", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_redteam_refuses_unknown_attack(tiny_tok, tiny_model_dir, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p")
    argv = _commands(tiny_model_dir, tmp_path, p)["redteam"]
    argv[argv.index("--attacks") + 1] = "none,no_such_attack"
    assert main(argv) == 2
    assert "no_such_attack" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- chat
def test_chat_reads_stdin_lines_and_shows_both_answers(tiny_tok, tiny_model_dir, tmp_path, capsys, monkeypatch):
    p = make_patch(tiny_tok, tmp_path / "p", std=2.0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/quit\nnever asked\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--patch", str(p), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("| patched") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("only the base\n\nnever asked\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    assert "| patched" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- calibrate
def test_calibrate_cli_records_applies_and_refuses_to_overwrite(tiny_tok, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch):
    import safetypatch.training.dev_checks

    # a flat curve: ties go to the smallest s
    monkeypatch.setattr(safetypatch.training.dev_checks, "keyword_refusal", lambda text: False)
    p = make_patch(tiny_tok, tmp_path / "p")
    sha = verify_files(p)["weights"]["sha256"]
    h = jsonl(tmp_path / "h.jsonl", [f"harmful request {i}" for i in range(3)])
    b = jsonl(tmp_path / "b.jsonl", [f"benign request {i}" for i in range(3)])
    argv = ["calibrate", "--patch", str(p), "--model", str(tiny_model_dir), "--dev-harmful", h, "--dev-benign", b,
            "--factors", "0.5,1", "--max-new-tokens", "3", "--out", str(tmp_path / "cal"), "--apply"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    meta = verify_files(p)  # patch.json gained the calibration; the weights' sha256 is unchanged
    cal = meta["calibration"]
    assert meta["weights"]["sha256"] == sha and [c["factor"] for c in cal["curve"]] == [0.0, 0.5, 1.0]
    assert cal["dev"] == {"harmful": h, "n_harmful": 3, "benign": b, "n_benign": 3}
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert saved["curve"] == cal["curve"] and (tmp_path / "cal" / "calibration.png").stat().st_size > 1000
    assert cal["chosen_factor"] == 0.5 and "chosen s = 0.5" in out and cal["applied_to"] == f"{p}-calibrated"
    scaled, orig = delta_weights(f"{p}-calibrated"), delta_weights(p)  # the applied patch: dW x 0.5
    assert set(scaled) == set(orig) and all(torch.allclose(scaled[k], 0.5 * orig[k], atol=1e-6) for k in orig)
    assert main(["patch", "info", str(p)]) == 0
    assert "calibration" in capsys.readouterr().out
    assert main(argv) == 2  # the same --out again: refused before any generation
    assert "already holds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- certificate
def test_eval_with_patch_records_certificate(tiny_tok, tiny_model_dir, tmp_path, capsys):
    p = make_patch(tiny_tok, tmp_path / "p")
    sha = verify_files(p)["weights"]["sha256"]
    prompts = jsonl(tmp_path / "h.jsonl", [f"request {i}" for i in range(3)])
    assert main(["eval", "--model", str(tiny_model_dir), "--patch", str(p), "--with-base", "--prompts", prompts,
                 "--out", str(tmp_path / "ev"), "--max-new-tokens", "3"]) == 0
    meta = verify_files(p)
    assert meta["weights"]["sha256"] == sha
    (ev,) = meta["evaluations"]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())["results"]
    assert ev["n"] == 3 and ev["date"] and prompts in ev["suite"]
    assert ev["refusal"] == {v: {j: summary[v][j] for j in ev["judges"]} for v in ("base", "patched")}
    capsys.readouterr()
    assert main(["patch", "info", str(p)]) == 0
    assert "1 evaluation(s)" in capsys.readouterr().out

