"""Export a patch for serving: a clean PEFT adapter for vLLM (`--enable-lora`) or a llama.cpp LoRA adapter (GGUF).

vLLM applies one scale (lora_alpha / r) to every module and accepts no modules_to_save, so per-module scales
(rank_pattern / alpha_pattern / rslora) are folded into lora_B. llama.cpp computes the scale per tensor as
adapter.lora.alpha / rank, so per-module scales are folded into lora_b there too. A lora_b must also get the row
reordering llama.cpp's converter (convert_hf_to_gguf) applies to the base weight: for `llama` (and `granite`) the
q / k rows are permuted for its RoPE layout (`LlamaModel.permute`, as convert_lora_to_gguf does), for `gptneox` the
fused query_key_value rows go from per-head (q, k, v) to q, k, v blocks; both need the base model's head counts.
Tensor names come from gguf's own HF -> GGUF tensor map; architectures whose converter layout is not known here
(GGUF_ROWS) are refused rather than written in a layout that might silently differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ModelError, PatchError
from ..io_utils import check_output, staged_file
from ..modeling import resolve_model
from .artifact import verify_files
from .finite import to_storage
from .ops import Delta, layer_of, lora_deltas, peft_key, peft_targets, read_adapter, write_adapter_dir

if TYPE_CHECKING:
    import numpy as np
    import torch

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
# HF model_type -> the llama.cpp architecture convert_hf_to_gguf writes for it
MODEL_TYPE_TO_GGUF = {"llama": "llama", "mistral": "llama", "granite": "granite", "qwen2": "qwen2", "qwen3": "qwen3",
                      "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
                      "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gptneox"}
# llama.cpp architecture -> how convert_hf_to_gguf reorders the rows of a weight (gguf MODEL_TENSOR member -> rule);
# lora_b's rows get the same reordering. Only these architectures are exported: for any other the converter's
# layout is not known here, and a file that silently mismatched it would be wrong.
#   rope_q / rope_k: LlamaModel.permute of q / k (llama, and GraniteModel, which extends LlamaModel)
#   neox_qkv: GPTNeoXModel's query_key_value rows (n_head, 3, head_dim) -> (3, n_head, head_dim)
#   GPT-2's Conv1D weights are transposed to (out, in) by the converter, which is PEFT's lora_B @ lora_A layout
GGUF_ROWS: dict[str, dict[str, str]] = {
    "llama": {"ATTN_Q": "rope_q", "ATTN_K": "rope_k"}, "granite": {"ATTN_Q": "rope_q", "ATTN_K": "rope_k"},
    "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {}, "gemma3": {}, "phi3": {}, "gpt2": {},
    "gptneox": {"ATTN_QKV": "neox_qkv"},
}
PERMUTE_QK_ARCHS = tuple(a for a, rules in GGUF_ROWS.items() if "rope_q" in rules.values())


def _is_standard(config: Mapping[str, Any]) -> bool:
    return not (config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"))


# ------------------------------------------------------------------------------------------------ PEFT / vLLM
def _rank_hint(rank: int) -> int | None:
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def export_peft(patch_dir: str | Path, out_dir: str | Path, max_lora_rank: int = 16,
                overwrite: bool = False) -> list[str]:
    """Write a clean PEFT adapter dir (adapter_config.json + adapter_model.safetensors) that vLLM loads with
    `--enable-lora`; returns warnings (e.g. the rank is above `max_lora_rank`)."""
    import torch

    meta = verify_files(patch_dir)
    config, _ = read_adapter(patch_dir)
    deltas = lora_deltas(patch_dir, fan_in_fan_out_ok=True)
    if _is_standard(config):
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
        tensors = {peft_key(m, ab): t for m, (a, b, _) in deltas.items() for ab, t in (("A", a), ("B", b))}
    else:  # one rank and scale for all: r = max rank (zero-padded), alpha = r (scale 1), scales folded into lora_B
        rank = max(a.shape[0] for a, _, _ in deltas.values())
        alpha = float(rank)
        tensors = {}
        for m, (a, b, s) in deltas.items():
            pad = rank - a.shape[0]
            tensors[peft_key(m, "A")] = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            b_scaled = to_storage(b.to(torch.float32) * s, b.dtype, peft_key(m, "B"), "export",
                                  f"folding the scale {s:g} of {patch_dir}")
            tensors[peft_key(m, "B")] = torch.cat([b_scaled, b.new_zeros(b.shape[0], pad)], dim=1)
    clean = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": peft_targets(config, list(deltas)), "bias": "none", "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": config.get("layers_to_transform"), "layers_pattern": config.get("layers_pattern"),
        "base_model_name_or_path": config.get("base_model_name_or_path") or meta.get("base_model", {}).get("spec"),
        "inference_mode": True, "init_lora_weights": True,
    }
    write_adapter_dir(out_dir, clean, tensors, meta=None, overwrite=overwrite, op="export",
                      cause=f"the patch {patch_dir}")
    warnings = []
    if rank > max_lora_rank:
        hint = _rank_hint(rank)
        warnings.append(f"rank {rank} > {max_lora_rank}: vLLM needs --max-lora-rank >= {rank}"
                        + (f" (use --max-lora-rank {hint})" if hint else " (above vLLM's largest, 512)"))
    return warnings


# ------------------------------------------------------------------------------------------------ GGUF / llama.cpp
def permute_rows(w: "torch.Tensor", n_head: int, n_head_kv: int | None = None) -> "torch.Tensor":
    """llama.cpp's q/k row permutation (convert_hf_to_gguf LlamaModel.permute) applied to the rows of `w`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    if w.shape[0] % (2 * n_head):
        raise PatchError(f"cannot permute {tuple(w.shape)} for {n_head} heads: rows are not a multiple of 2 * heads")
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_arch(arch: str) -> Any:
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise PatchError(f"unknown llama.cpp architecture {arch!r} (e.g. llama, qwen2, qwen3, gemma2, phi3)")
    return by_name[arch]


def gguf_arch_for(meta: Mapping[str, Any], arch: str | None) -> str:
    """The llama.cpp architecture to export for: `arch`, checked against the base model's model_type recorded in
    patch.json, or (None) derived from it; PatchError when llama.cpp's layout for it is not known here."""
    model_type = meta.get("base_model", {}).get("fingerprint", {}).get("model_type")
    expected = MODEL_TYPE_TO_GGUF.get(str(model_type))
    if arch is None:
        if expected is None:
            raise PatchError(f"the patch's base model (model_type {model_type!r}) has no known llama.cpp "
                             f"architecture; pass --arch (one of {', '.join(GGUF_ROWS)}) if llama.cpp converts it "
                             "like one of those, or export with --format peft")
        arch = expected
    _gguf_arch(arch)
    if expected is not None and arch != expected:
        raise PatchError(f"--arch {arch}: the patch's base model is model_type {model_type!r}, which llama.cpp's "
                         f"converter writes as {expected!r}; pass --arch {expected} (or leave --arch out)")
    if arch not in GGUF_ROWS:
        raise PatchError(f"--arch {arch}: how llama.cpp's converter lays out this architecture's weights (row "
                         "permutations, fused or transposed matrices) is not known to safetypatch, so the adapter "
                         f"could be silently wrong; supported: {', '.join(GGUF_ROWS)}; use --format peft")
    return arch


def gguf_tensor(module: str, arch: str) -> tuple[str, str]:
    """(llama.cpp name of the weight a module patches, its MODEL_TENSOR member name), by gguf's own HF -> GGUF
    tensor map: `model.layers.3.mlp.up_proj` -> (`blk.3.ffn_up.weight`, `FFN_UP`)."""
    import gguf

    bid = layer_of(module)
    found = None
    if bid is not None:
        tmap = gguf.get_tensor_name_map(_gguf_arch(arch), bid + 1)
        found = tmap.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
    if found is None:
        raise PatchError(f"module {module}: llama.cpp architecture {arch!r} has no tensor for it (gguf's tensor "
                         "map knows no such decoder-layer weight); export with --format peft")
    kind, name = found
    return name, kind.name


def gguf_tensor_base(module: str, arch: str) -> str:
    """llama.cpp name of the weight a module patches: `model.layers.3.mlp.up_proj` -> `blk.3.ffn_up.weight`."""
    return gguf_tensor(module, arch)[0]


def reorder_rows(b: "torch.Tensor", rule: str | None, heads: tuple[int, int] | None, module: str) -> "torch.Tensor":
    """lora_b with its rows reordered as llama.cpp's converter reorders the base weight's (GGUF_ROWS)."""
    if rule is None:
        return b
    if heads is None:
        raise PatchError(f"module {module}: need the base model's attention head counts; pass --model or --n-head")
    if rule in ("rope_q", "rope_k"):
        return permute_rows(b, heads[0], heads[0] if rule == "rope_q" else heads[1])
    n_head = heads[0]
    if b.shape[0] % (3 * n_head):
        raise PatchError(f"module {module}: {b.shape[0]} rows are not 3 x {n_head} heads; cannot reorder them for "
                         "llama.cpp's gptneox layout (wrong --n-head?)")
    return b.reshape(n_head, 3, b.shape[0] // (3 * n_head), -1).transpose(0, 1).reshape(b.shape)


def head_counts(spec: str | None) -> tuple[int, int]:
    """(n_head, n_head_kv) of a base model given as a model directory, a .gguf file or a hub id."""
    try:
        if not spec:
            raise ModelError("no base model given")
        kind, loc = resolve_model(spec)
        if kind == "gguf":
            return _gguf_head_counts(Path(loc))
        if kind == "dir":
            cfg = json.loads((Path(loc) / "config.json").read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(loc).to_dict()
        n_head = int(cfg["num_attention_heads"])
        return n_head, int(cfg.get("num_key_value_heads") or n_head)
    except (ModelError, OSError, KeyError, ValueError) as e:
        raise PatchError(f"need the base model's attention head counts to reorder q / k (or query_key_value) rows "
                         f"as llama.cpp's converter does, "
                         f"but could not read them from {spec!r} ({e}); pass --model or --n-head / --n-head-kv") from None


def _gguf_head_counts(path: Path) -> tuple[int, int]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.get_field("general.architecture").contents()  # type: ignore[union-attr]
    n_head = int(r.get_field(f"{arch}.attention.head_count").contents())  # type: ignore[union-attr]
    kv = r.get_field(f"{arch}.attention.head_count_kv")
    return n_head, int(kv.contents()) if kv is not None else n_head


def _gguf_tensors(deltas: Mapping[str, Delta], alpha: float, arch: str, heads: tuple[int, int] | None,
                  dtype: str) -> dict[str, "np.ndarray"]:
    """{`blk.i.x.weight.lora_a`: (r, in), `...lora_b`: (out, r)} with each module's scale folded so that
    llama.cpp's alpha / rank gives it back, and lora_b's rows reordered as the converter reorders the weight's."""
    import numpy as np
    import torch

    out = {}
    for module, (a, b, s) in sorted(deltas.items(), key=lambda kv: (layer_of(kv[0]) or 0, kv[0])):
        name, kind = gguf_tensor(module, arch)
        a32, b32 = a.to(torch.float32), b.to(torch.float32) * (s * a.shape[0] / alpha)
        b32 = reorder_rows(b32, GGUF_ROWS[arch].get(kind), heads, module)
        for suffix, t in ((".lora_a", a32), (".lora_b", b32)):
            arr = t.contiguous().numpy().astype(dtype)
            if not np.isfinite(arr).all():
                raise PatchError(f"export: {name}{suffix} is beyond the range of {dtype} (|x| up to "
                                 f"{float(t.abs().max()):.3g}) or not finite; export with --dtype float32")
            out[name + suffix] = arr
    return out


def export_gguf(patch_dir: str | Path, out_file: str | Path, arch: str | None = None, model: str | None = None,
                n_head: int | None = None, n_head_kv: int | None = None, dtype: str = "float32",
                overwrite: bool = False) -> list[str]:
    """Write a llama.cpp LoRA adapter (GGUF, general.type=adapter) atomically; returns warnings.

    `arch` defaults to the llama.cpp architecture of the base model's model_type (patch.json). `model` (or the
    base spec recorded in patch.json), or `n_head` / `n_head_kv`, give the head counts needed where the converter
    reorders rows (q / k for llama and granite, query_key_value for gptneox)."""
    if dtype not in ("float32", "float16"):
        raise PatchError(f"GGUF export dtype must be float32 or float16, got {dtype!r}")
    out = Path(out_file)
    check_output(out, overwrite, "file")  # fail fast; checked again under the output's lock when writing
    if arch is not None:
        _gguf_arch(arch)
    meta = verify_files(patch_dir)
    arch = gguf_arch_for(meta, arch)
    config, _ = read_adapter(patch_dir)
    deltas = lora_deltas(patch_dir, fan_in_fan_out_ok=True)  # PEFT's A / B are (out, in) for Conv1D too
    alpha = (float(config.get("lora_alpha", 8)) if _is_standard(config)
             else float(max(a.shape[0] for a, _, _ in deltas.values())))
    kinds = {gguf_tensor(m, arch)[1] for m in deltas}
    heads = None
    if kinds & set(GGUF_ROWS[arch]):
        heads = (n_head, n_head_kv or n_head) if n_head else head_counts(model or meta.get("base_model", {}).get("spec"))
    tensors = _gguf_tensors(deltas, alpha, arch, heads, dtype)
    _write_gguf(out, arch, alpha, tensors, name=Path(patch_dir).name, overwrite=overwrite)
    model_type = meta.get("base_model", {}).get("fingerprint", {}).get("model_type")
    if str(model_type) not in MODEL_TYPE_TO_GGUF:
        return [f"the base model's model_type {model_type!r} is not one safetypatch maps to llama.cpp; written in "
                f"the {arch!r} layout because --arch says so: check llama.cpp converts this model as {arch!r}"]
    return []


def _write_gguf(out: Path, arch: str, alpha: float, tensors: Mapping[str, "np.ndarray"], name: str,
                overwrite: bool = False) -> None:
    """GGUFWriter into a temp file beside `out`, committed by `io_utils.staged_file` (locked, atomic)."""
    import gguf

    with staged_file(out, overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_string(gguf.Keys.General.NAME, name)
        for tname, arr in tensors.items():
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
