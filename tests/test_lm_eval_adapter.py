"""lm-evaluation-harness adapter: the simple_evaluate arguments, and a clear error without lm-eval."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import safetypatch.modeling as models
from safetypatch.errors import LMEvalUnavailable
from safetypatch.evals.lm_eval_adapter import model_args, run_lm_eval, simple_evaluate_kwargs
from safetypatch.errors import ModelError
from safetypatch.errors import PatchError


@pytest.fixture()
def fake_patch(tmp_path):
    d = tmp_path / "patch"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(b"")
    return d


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr(models, "model_directory", lambda spec: pytest.fail("no model work before the check"))
    with pytest.raises(LMEvalUnavailable) as e:
        run_lm_eval("default", tasks="arc_easy")
    assert isinstance(e.value, ModelError)
    assert "not installed" in str(e.value) and "pip install 'safetypatch[lm-eval]'" in str(e.value)


def test_kwargs_with_local_dir_and_patch(tiny_model_dir, fake_patch):
    kw = simple_evaluate_kwargs(str(tiny_model_dir), fake_patch, tasks="arc_easy, hellaswag", num_fewshot=0,
                                limit=10, device="cpu", seed=3)
    assert kw == {
        "model": "hf", "model_args": f"pretrained={tiny_model_dir},peft={fake_patch}",
        "tasks": ["arc_easy", "hellaswag"], "batch_size": 1, "num_fewshot": 0, "device": "cpu", "limit": 10,
        "random_seed": 3, "numpy_random_seed": 3, "torch_random_seed": 3,
    }


def test_default_model_uses_cached_safetensors_dir(monkeypatch, fake_patch):
    assert model_args("org/name") == "pretrained=org/name"  # a hub id passes through (no patch)
    seen = []

    def fake_dir(spec):
        seen.append(spec)
        return "/cache/models/SmolLM2-135M-Instruct.Q4_1-abc"

    monkeypatch.setattr(models, "model_directory", fake_dir)
    args = model_args("default", fake_patch, dtype="float32", extra={"trust_remote_code": False})
    assert seen == ["default"]
    assert args == (f"pretrained=/cache/models/SmolLM2-135M-Instruct.Q4_1-abc,peft={fake_patch},dtype=float32,"
                    "trust_remote_code=false")


def test_bad_arguments(tiny_model_dir, tmp_path, fake_patch):
    with pytest.raises(PatchError, match="no such patch directory"):
        model_args(str(tiny_model_dir), tmp_path / "missing")
    comma = tmp_path / "a,b"
    fake_patch.rename(comma)
    with pytest.raises(ModelError, match="contains ',' or '='"):
        model_args(str(tiny_model_dir), comma)
    with pytest.raises(ValueError, match="no tasks"):
        simple_evaluate_kwargs(str(tiny_model_dir), tasks=" , ")


def test_run_passes_arguments_through(monkeypatch, tiny_model_dir, fake_patch):
    calls = []
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kw: calls.append(kw) or {"results": {"arc_easy": {"acc,none": 0.5}}}
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    out = run_lm_eval(str(tiny_model_dir), fake_patch, tasks=["arc_easy"], batch_size=4)
    assert out["results"]["arc_easy"]["acc,none"] == 0.5
    assert calls == [{"model": "hf", "model_args": f"pretrained={tiny_model_dir},peft={fake_patch}",
                      "tasks": ["arc_easy"], "batch_size": 4,
                      "device": "cuda" if torch.cuda.is_available() else "cpu"}]


def test_device_defaults_to_cpu_without_cuda(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert simple_evaluate_kwargs(str(tiny_model_dir), tasks="arc_easy")["device"] == "cpu"
    assert simple_evaluate_kwargs(str(tiny_model_dir), tasks="arc_easy", device="cuda:1")["device"] == "cuda:1"


def test_include_path_must_be_a_directory(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=lambda **kw: kw))
    with pytest.raises(ModelError, match="not a directory"):
        run_lm_eval("default", tasks="x", include_path=tmp_path / "missing")
