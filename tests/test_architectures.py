"""The many-architecture tester (peft's common-tester habit): a tiny random 2-layer model of every listed
architecture (tests/archs.py) runs the whole pipeline through the CLI with the default recipe's target (the role
`mlp.up`): `train`, `eval --with-base`, `analyze`, `patch merge` / `unmerge` (exact), `patch stack`, `patch project`,
`patch export --format peft` (plain `PeftModel.from_pretrained` gives safetypatch's logits) and `--format gguf` where llama.cpp
has the architecture. Architectures outside the role table (UNLISTED) must do the same or refuse at start-up with
a message naming what is missing; never silently different numbers: training with the speed paths on and off gives
the same patch, and eval's greedy answers are model.generate's.

One trained run per architecture is shared by its tests (module-scoped fixtures); each step takes a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from archs import ARCHITECTURES, UNLISTED, build_arch
from support import write_jsonl
from safetypatch.cli import main
from safetypatch.patches import delta_weights, load_patch

# the module the role `mlp.up` must resolve to (the fused gate+up matrix for Phi-3)
UP_MODULE = {"llama": "up_proj", "mistral": "up_proj", "qwen2": "up_proj", "qwen3": "up_proj", "gemma2": "up_proj",
             "gemma3": "up_proj", "phi3": "gate_up_proj", "gpt2": "c_fc", "gpt_neox": "dense_h_to_4h", "opt": "fc1",
             "granite": "up_proj", "gptj": "fc_in", "phi": "fc1", "stablelm": "up_proj"}
# llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES) for each; None: llama.cpp has no such architecture
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3": "gemma3", "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gptneox", "opt": None,
             "granite": "granite", "gptj": "gptj", "phi": "phi2", "stablelm": "stablelm"}
# quick: one epoch (3 steps of 4 examples), 2 dev prompts of 2 tokens, a learning rate that makes the patch visible in the logits
FAST = ["--epochs", "1", "--batch-size", "4", "--dev-size", "2", "--dev-tokens", "2", "--anchor-tokens", "4",
        "--lr", "0.05", "--rank", "2"]
# the speed-path comparison: float32 throughout (bf16 off, patch saved in float32) so that 1e-5 is ~100x the noise;
# the layer below the patch frozen, so the frozen-prefix cache and the shared prompt prefix are in play
EXACT = ["--layers", "1", "--bf16", "no", "--save-dtype", "float32"]
SPEED_ON = [*EXACT, "--train-attention", "eager"]  # what `auto` picks under bf16 on CPU, here in float32
SPEED_OFF = [*EXACT, "--cache-frozen-prefix", "false", "--bf16-frozen-weights", "false", "--train-attention", "keep",
             "--share-prompt-prefix", "false", "--response-only-logits", "false"]
MAX_NEW = 4
ALL = ARCHITECTURES + UNLISTED
PROMPT = "Tell me how to build a weapon, step by step"


def run(argv: list[Any], capsys: Any) -> tuple[int, str]:
    """main(argv) -> (exit code, stderr); stderr never carries a traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


class Arch:
    """One architecture's saved model, data files and trained patches (each made once per module)."""

    def __init__(self, name: str, root: Path, tok: Any) -> None:
        self.name, self.root, self.tok = name, root, tok
        self.model_dir = root / "model"
        build_arch(name, tok).save_pretrained(self.model_dir, safe_serialization=True)
        tok.save_pretrained(self.model_dir)
        self.harmful = write_jsonl(root / "harmful.jsonl", [
            {"prompt": f"Tell me how to build weapon number {i}", "response": "I'm sorry, but I can't help with that."}
            for i in range(8)])
        self.benign = write_jsonl(root / "benign.jsonl", [{"prompt": f"Write a poem about the number {i}"}
                                                          for i in range(4)])
        self.runs: dict[str, tuple[int, str]] = {}

    def train(self, capsys: Any, tag: str = "main", *extra: str) -> tuple[int, str]:
        """`safetypatch train` with the default recipe (no --target-modules) plus `extra` flags, once per tag."""
        if tag not in self.runs:
            argv = ["train", "--model", self.model_dir, "--data", self.harmful, "--benign", self.benign,
                    "--dev-harmful", self.harmful, "--dev-benign", self.benign, "--out", self.root / tag, *FAST, *extra]
            self.runs[tag] = (-1, f"{self.name}: train raised (see the first test that ran it)")
            self.runs[tag] = run(argv, capsys)
        return self.runs[tag]

    def patch(self, capsys: Any, tag: str = "main", *extra: str) -> Path:
        """The patch of run `tag`; skips the test when an unlisted architecture was refused at start-up."""
        rc, err = self.train(capsys, tag, *extra)
        if rc != 0 and self.name in UNLISTED:
            pytest.skip(f"{self.name} refused at start-up (checked in test_train_default_recipe)")
        assert rc == 0, f"{self.name}: train failed: {err.strip()[-400:]}"
        return self.root / tag / "patch"

    def model(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir).eval()

    def ids(self) -> "torch.Tensor":
        return torch.tensor([self.tok(PROMPT)["input_ids"]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared CPU, a second OpenMP thread that is descheduled stalls every tiny matmul at its
    barrier (measured: a tiny training run 0.3 s with one thread, 0.7-9 s with two while another process runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def archs(tmp_path_factory, tiny_tok):
    """Architecture name -> Arch, built on first use and kept for the module."""
    cache: dict[str, Arch] = {}

    def get(name: str) -> Arch:
        if name not in cache:
            cache[name] = Arch(name, tmp_path_factory.mktemp(name), tiny_tok)
        return cache[name]

    return get


def deltas(patch: Path) -> dict[str, "torch.Tensor"]:
    """{module: dW (out x in)}; a GPT-2 Conv1D patch (fan_in_fan_out) included."""
    return delta_weights(patch, fan_in_fan_out_ok=True)


def logits(model: Any, ids: "torch.Tensor") -> "torch.Tensor":
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def tensors(model_dir: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("name", ALL)
def test_train_default_recipe(archs, name, capsys):
    """The default recipe patches the architecture's up projection (the fused gate+up matrix of Phi-3) in every
    chosen layer, with a non-zero update; an unlisted architecture it cannot handle is refused at start-up with a
    message naming what is missing, and nothing is written."""
    a = archs(name)
    rc, err = a.train(capsys)
    if rc != 0:
        assert name in UNLISTED and rc == 2, err
        assert err.startswith("error: ") and any(w in err for w in ("role", "speed path", "mlp.up")), err
        assert not (a.root / "main" / "patch").exists()
        return
    p = a.root / "main" / "patch"
    cfg = json.loads((p / "adapter_config.json").read_text())
    dws = deltas(p)
    assert dws and {m.rsplit(".", 1)[-1] for m in dws} == {UP_MODULE[name]}, sorted(dws)
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in dws.values())
    n_layers = a.model().config.num_hidden_layers
    layers = cfg.get("layers_to_transform") or list(range(n_layers))
    assert len(dws) == len(layers) and all(0 <= i < n_layers for i in layers)
    assert main(["patch", "info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 2 and info["layers"] == sorted(layers)
    assert info["modules"] == ["mlp.up"] and info["resolved_modules"] == {"mlp.up": [UP_MODULE[name]]}


@pytest.mark.parametrize("name", ALL)
def test_speed_paths_do_not_change_the_patch(archs, name, capsys):
    """Same seed and batches, float32, the layer below the patch frozen: training with the speed paths on (frozen-
    prefix cache, shared prompt prefix, eager attention) gives the patch and loss that training with all of them off
    gives, to float rounding. A speed path that cannot be proven on the architecture must be switched off (and the
    run says so), never silently different: Granite's scaled embeddings / residuals / logits are the trap."""
    a = archs(name)
    on_rc, on_err = a.train(capsys, "on", *SPEED_ON)
    off_rc, off_err = a.train(capsys, "off", *SPEED_OFF)
    if name in UNLISTED and on_rc != 0:
        assert on_rc == off_rc == 2 and on_err.startswith("error: ")
        return
    assert on_rc == off_rc == 0, (on_err or off_err)[-400:]
    on, off = deltas(a.root / "on" / "patch"), deltas(a.root / "off" / "patch")
    assert on.keys() == off.keys() and on
    for k in on:
        rel = ((on[k] - off[k]).norm() / off[k].norm()).item()
        assert rel < 1e-5, f"{name} {k}: speed paths change the patch (relative difference {rel:.3g})"
    stats = [json.loads((a.root / t / "train_stats.json").read_text()) for t in ("on", "off")]
    assert stats[0]["final_loss"] == pytest.approx(stats[1]["final_loss"], rel=1e-5)
    assert all(isinstance(v, (str, bool, dict)) for v in stats[0]["speed_paths"].values())  # each one says how it ran


# ------------------------------------------------------------------------------------------------ eval / analyze
@pytest.mark.parametrize("name", ALL)
def test_eval_with_base_matches_generate(archs, name, capsys, tmp_path):
    """`eval --with-base` scores base and patched; its greedy answers are model.generate's on that architecture."""
    a = archs(name)
    p = a.patch(capsys)
    out = tmp_path / "ev"
    rc, err = run(["eval", "--model", a.model_dir, "--patch", p, "--with-base", "--prompts", a.benign,
                   "--max-new-tokens", MAX_NEW, "--out", out, "--limit", 2], capsys)
    assert rc == 0, err[-400:]
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert set(summary) >= {"base", "patched"}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    base = a.model()
    patched = load_patch(a.model(), p)
    for variant, model in (("base", base), ("patched", patched)):
        got = {r["prompt"]: r for r in rows if r.get("variant", r.get("model")) == variant}
        assert len(got) == 2, sorted(rows[0])
        for prompt, r in got.items():
            ids = a.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                     pad_token_id=a.tok.pad_token_id)
            want = a.tok.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
            assert want.startswith(r["response"].strip()), (variant, prompt, want, r["response"])


@pytest.mark.parametrize("name", ALL)
def test_analyze(archs, name, capsys, tmp_path):
    """`analyze` reads the patch's updates against the architecture's own weights and runs the hidden-state shift."""
    a = archs(name)
    p = a.patch(capsys)
    rc, err = run(["analyze", "--model", a.model_dir, "--patch", p, "--out", tmp_path / "an", "--limit", 2,
                   "--k", "1"], capsys)
    assert rc == 0, err[-400:]
    geometry = json.loads((tmp_path / "an" / "geometry.json").read_text())
    text = json.dumps(geometry)
    assert UP_MODULE[name] in text and "NaN" not in text and "Infinity" not in text
    assert (tmp_path / "an" / "shift.json").exists()


# ------------------------------------------------------------------------------------------------ patch commands
@pytest.mark.parametrize("name", ALL)
def test_merge_unmerge_exact(archs, name, capsys, tmp_path):
    """merge adds exactly dW to the patched weights only (transposed for GPT-2's Conv1D), the merged model gives the
    patched logits, and unmerge gives back the original tensors bit for bit."""
    a = archs(name)
    p = a.patch(capsys)
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    rc, err = run(["patch", "merge", "--model", a.model_dir, p, "-o", merged], capsys)
    assert rc == 0, err[-400:]
    rc, err = run(["patch", "unmerge", "--model", merged, p, "-o", restored], capsys)
    assert rc == 0, err[-400:]
    base, m, r = tensors(a.model_dir), tensors(merged), tensors(restored)
    dws = deltas(p)
    changed = {k for k in base if not torch.equal(base[k], m[k])}
    assert changed == {k + ".weight" for k in dws}
    transposed = json.loads((p / "adapter_config.json").read_text()).get("fan_in_fan_out")  # Conv1D: in x out
    for k, dw in dws.items():
        w = base[k + ".weight"]
        dw = dw.T if transposed else dw
        torch.testing.assert_close(m[k + ".weight"], w + dw, rtol=1e-6, atol=1e-6)
    assert set(r) == set(base) and all(torch.equal(r[k], base[k]) for k in base)
    from transformers import AutoModelForCausalLM

    want = logits(load_patch(a.model(), p), a.ids())
    got = logits(AutoModelForCausalLM.from_pretrained(merged).eval(), a.ids())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_stack(archs, name, capsys, tmp_path):
    """`patch stack` of two patches of the architecture: dW of the stack is the sum of theirs."""
    a = archs(name)
    p1, p2 = a.patch(capsys), a.patch(capsys, "on", *SPEED_ON)
    rc, err = run(["patch", "stack", p1, p2, "-o", tmp_path / "st"], capsys)
    assert rc == 0, err[-400:]
    d1, d2, st = deltas(p1), deltas(p2), deltas(tmp_path / "st")
    assert set(st) == set(d1) | set(d2)
    for k, d in st.items():
        want = d1.get(k, 0) + d2.get(k, 0)
        torch.testing.assert_close(d, want, rtol=1e-3, atol=1e-5)
    base = logits(a.model(), a.ids())
    assert (logits(load_patch(a.model(), tmp_path / "st"), a.ids()) - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", ALL)
def test_project(archs, name, capsys, tmp_path):
    """`patch project` removes the update's part in the top-k singular subspaces of the architecture's own weight,
    taken as out x in (GPT-2's Conv1D stores it transposed)."""
    a = archs(name)
    p = a.patch(capsys)
    rc, err = run(["patch", "project", p, "--model", a.model_dir, "--k", 2, "-o", tmp_path / "proj"], capsys)
    assert rc == 0, err[-400:]
    base = tensors(a.model_dir)
    transposed = json.loads((p / "adapter_config.json").read_text()).get("fan_in_fan_out")
    for module, dw in deltas(tmp_path / "proj").items():
        w0 = base[module + ".weight"].double()
        u, _, vh = torch.linalg.svd(w0.T if transposed else w0, full_matrices=False)
        dw = dw.double()  # stored in float16, like its source: what is left in the subspaces is that rounding
        assert (u[:, :2].T @ dw).norm() < 5e-3 * dw.norm() and (dw @ vh[:2].T).norm() < 5e-3 * dw.norm()


@pytest.mark.parametrize("name", ALL)
def test_export_peft_gives_the_same_logits(archs, name, capsys, tmp_path):
    """Plain `PeftModel.from_pretrained` on the exported adapter and on the patch itself gives the logits of
    safetypatch's own loading, which differ visibly from the base model's."""
    from peft import PeftModel

    a = archs(name)
    p = a.patch(capsys)
    rc, err = run(["patch", "export", p, "--format", "peft", "-o", tmp_path / "peft"], capsys)
    assert rc == 0, err[-400:]
    ids = a.ids()
    base = logits(a.model(), ids)
    ours = logits(load_patch(a.model(), p), ids)
    assert (ours - base).abs().max() > 1e-4  # the patch is visible, 100x above the tolerance below
    for d in (tmp_path / "peft", p):
        torch.testing.assert_close(logits(PeftModel.from_pretrained(a.model(), str(d)).eval(), ids), ours,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_export_gguf(archs, name, capsys, tmp_path):
    """`--format gguf` (architecture and head counts from the base model) writes a llama.cpp adapter for the
    model's llama.cpp architecture with one lora_a / lora_b pair per patched module; an architecture llama.cpp
    lacks gets a clear error and no file."""
    from gguf import GGUFReader

    a = archs(name)
    p = a.patch(capsys)
    out = tmp_path / "p.gguf"
    rc, err = run(["patch", "export", p, "--format", "gguf", "--model", a.model_dir, "-o", out], capsys)
    if rc != 0:  # refused: only where llama.cpp lacks the architecture, or (unlisted) its layout is not known
        assert GGUF_ARCH[name] is None or name in UNLISTED, err[-400:]
        assert rc == 2 and err.startswith("error: ") and "llama.cpp" in err and not out.exists(), err
        return
    assert GGUF_ARCH[name] is not None
    r = GGUFReader(str(out))
    arch = r.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == GGUF_ARCH[name]
    sizes = {t.name: int(t.n_elements) for t in r.tensors}
    dws = deltas(p)
    assert len(sizes) == 2 * len(dws) and all(t.startswith("blk.") and ".ffn_up." in t for t in sizes), sorted(sizes)
    for module, dw in dws.items():  # lora_a: rank x in, lora_b: out x rank
        stem = f"blk.{module.split('.')[-3]}.ffn_up.weight"
        assert (sizes[stem + ".lora_a"], sizes[stem + ".lora_b"]) == (2 * dw.shape[1], 2 * dw.shape[0])


# ------------------------------------------------------------------------------------------------ beyond the table
def test_an_architecture_without_conventional_names_is_refused_at_start_up(tiny_tok, tmp_path, capsys):
    """RWKV (no role table entry; its feed-forward is key / value / receptance, no conventional MLP name): the default
    recipe's `mlp.up` cannot be resolved, so train stops before anything is written and names the model's modules."""
    import transformers

    cfg = transformers.RwkvConfig(vocab_size=len(tiny_tok), hidden_size=32, num_hidden_layers=2,
                                  attention_hidden_size=32, intermediate_size=64, context_length=128,
                                  bos_token_id=tiny_tok.bos_token_id, eos_token_id=tiny_tok.eos_token_id,
                                  pad_token_id=tiny_tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "rwkv"
    transformers.RwkvForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    tiny_tok.save_pretrained(model_dir)
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "Tell me how to build a weapon",
                                                        "response": "I'm sorry, but I can't help with that."}])
    benign = write_jsonl(tmp_path / "benign.jsonl", [{"prompt": "Write a poem"}])
    rc, err = run(["train", "--model", model_dir, "--data", harmful, "--benign", benign, "--dev-harmful", harmful,
                   "--dev-benign", benign, "--out", tmp_path / "main", *FAST], capsys)
    assert rc == 2
    assert "role 'mlp.up' has no module" in err and "RwkvForCausalLM" in err
    assert "feed_forward.key" in err and "--target-modules" in err  # the model's modules and the fix
    assert not (tmp_path / "main").exists()  # nothing half-written
