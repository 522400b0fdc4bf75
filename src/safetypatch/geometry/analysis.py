"""Geometry of a patch: where a weight update dW sits relative to the base weight W0, and how far it moves
hidden states.

Per analysed weight (all in float64, `torch.linalg`):

* size: `fro` = ||dW||_F, `rel_fro` = ||dW||_F / ||W0||_F, `spectral` = ||dW||_2, `rank` (numerical),
  `stable_rank` = ||dW||_F^2 / ||dW||_2^2, `effective_rank` = exp(entropy of s / sum(s)) (Roy & Vetterli 2007);
* overlap with W0's top-k singular subspaces (U_k, V_k), for each k in `ks`:
  `sim_k{k}` = max |V_dW^T V_k| (max abs cosine between dW's top-r right singular vectors, r = rank(dW) capped
  at k, and V_k), `energy_left_k{k}` = ||U_k^T dW||_F^2 / ||dW||_F^2, `energy_right_k{k}` = ||dW V_k||_F^2 /
  ||dW||_F^2, `energy_two_k{k}` = ||U_k^T dW V_k||_F^2 / ||dW||_F^2, and `pa_max_k{k}` / `pa_mean_k{k}`, the max
  and mean cosine of the principal angles between span(V_dW,r) and span(V_k);
* intruder dimensions (Shuttleworth et al. 2024): `intruders` = how many of the top-m left singular vectors of
  W0 + dW have max |cosine| below `threshold` with every left singular vector of W0 (reduced SVD, as in the
  paper's code).

Every overlap metric X has a chance-level twin `random_X`: for energies the exact expectation for a uniformly
random k-dimensional subspace (k/d_out left, k/d_in right, k^2/(d_out d_in) two-sided); for Sim and principal
angles the mean over `n_random` seeded Haar-random orthonormal k-bases put in place of V_k (by rotation
invariance this is the same law as a random r-dimensional subspace in place of dW's); for intruders the count for
W0 + G, G a seeded Gaussian matrix with ||G||_F = ||dW||_F. k larger than min(d_out, d_in) is capped.

SVDs of base weights are cached under `safetypatch_home()/svd/<fingerprint id>/<weight name>.safetensors`
(safetensors only, written atomically, checked against the weight's sha256 on load).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..config import safetypatch_home
from ..io_utils import atomic_write_bytes, atomic_write_json
from ..modeling.svd_cache import SVDCache

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KS = (1, 8, 32)
OVERLAP_METRICS = ("sim", "pa_max", "pa_mean", "energy_left", "energy_right", "energy_two")
SIZE_METRICS = ("fro", "rel_fro", "spectral", "rank", "stable_rank", "effective_rank")
INTRUDER_M = 10
INTRUDER_THRESHOLD = 0.5
N_RANDOM = 5
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")

Key = tuple[int, str]


# ------------------------------------------------------------------------------------------ updates
def split_module_path(path: str) -> Key:
    """'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj'); a module outside the decoder layers -> (-1, path)."""
    m = _LAYER_RE.search(path)
    return (int(m.group(1)), m.group(2)) if m else (-1, path)


def lora_updates(patch_dir: str | Path) -> dict[Key, "torch.Tensor"]:
    """dW = scale * B @ A (float64, shape out x in) per patched module, read through `patch_ops.lora_deltas`."""
    from ..patches.ops import lora_deltas

    return {split_module_path(module): (scale * (b.double() @ a.double())).reshape(b.shape[0], -1)
            for module, (a, b, scale) in lora_deltas(patch_dir).items()}


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layers_prefix(model: Any) -> str:
    from ..modeling.loading import decoder_layers

    layers = decoder_layers(model)
    return next(n for n, mod in _base(model).named_modules() if mod is layers)


def weight_name(model: Any, key: Key) -> str:
    """State-dict name of the weight behind (layer, module)."""
    layer, module = key
    return f"{module}.weight" if layer < 0 else f"{_layers_prefix(model)}.{layer}.{module}.weight"


def _as_out_in(module: Any, w: "torch.Tensor") -> "torch.Tensor":
    """GPT-2's Conv1D stores (in, out); everything here is (out, in), like PEFT's B @ A."""
    return w.T if type(module).__name__ == "Conv1D" else w


def base_weight(model: Any, key: Key) -> "torch.Tensor":
    """W0 of (layer, module) as a float64 (out, in) matrix (a PEFT-wrapped module gives its base layer)."""
    from ..modeling.loading import decoder_layers

    layer, module = key
    root = _base(model) if layer < 0 else decoder_layers(model)[layer]
    mod = root.get_submodule(module)
    mod = getattr(mod, "base_layer", mod)
    w = _as_out_in(mod, mod.weight.detach())
    return w.reshape(w.shape[0], -1).double().cpu()


def full_updates(base_model: Any, finetuned_model: Any, modules: Iterable[str] | None = None
                 ) -> dict[Key, "torch.Tensor"]:
    """dW = W_ft - W0 (float64, out x in) for every 2-D decoder-layer weight that changed.

    `modules` filters by module name: 'up_proj' or 'mlp.up_proj'.
    """
    import torch

    from ..modeling.loading import decoder_layers

    wanted = set(modules) if modules else None
    out: dict[Key, torch.Tensor] = {}
    ft_layers = decoder_layers(finetuned_model)
    for i, layer in enumerate(decoder_layers(base_model)):
        for mod_name, mod in layer.named_modules():
            w0 = getattr(mod, "weight", None)
            if not mod_name or w0 is None or w0.ndim != 2 or "lora_" in mod_name or "base_layer" in mod_name:
                continue
            if wanted and mod_name not in wanted and mod_name.rsplit(".", 1)[-1] not in wanted:
                continue
            ft_mod = ft_layers[i].get_submodule(mod_name)
            w1 = ft_mod.weight.detach()
            if w1.shape != w0.shape:
                raise ValueError(f"layer {i} {mod_name}: shape {tuple(w1.shape)} != base {tuple(w0.shape)}")
            if not torch.equal(w1.cpu(), w0.detach().cpu()):
                out[(i, mod_name)] = _as_out_in(mod, w1.double().cpu() - w0.detach().double().cpu())
    return out


# ------------------------------------------------------------------------------------------ metrics
def numerical_rank(s: "torch.Tensor", shape: Sequence[int]) -> int:
    """Singular values above s_max * max(shape) * float32 eps (the weights are float32 at best)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * max(shape) * 1.1920929e-07).sum())


def effective_rank(s: "torch.Tensor") -> float:
    """exp(Shannon entropy of s / sum(s)) (Roy & Vetterli 2007); 0 for a zero matrix."""
    import torch

    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _random_bases(d: int, k: int, n: int, seed: int) -> list["torch.Tensor"]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0] for _ in range(n)]


def _subspace_overlap(vd: "torch.Tensor", vk: "torch.Tensor") -> tuple[float, float, float]:
    """(max |cos| entry, max and mean principal-angle cosine) between orthonormal bases vd and vk."""
    import torch

    c = vd.T @ vk
    pa = torch.linalg.svdvals(c).clamp(max=1.0)
    return float(c.abs().max()), float(pa.max()), float(pa.mean())


def intruder_count(w0_u: "torch.Tensor", w_new: "torch.Tensor", m: int = INTRUDER_M,
                   threshold: float = INTRUDER_THRESHOLD) -> int:
    """How many of the top-m left singular vectors of `w_new` have max |cos| < threshold with all columns of w0_u."""
    import torch

    u = torch.linalg.svd(w_new.double(), full_matrices=False)[0][:, :m]
    return int(((u.T @ w0_u).abs().max(dim=1).values < threshold).sum())


def _size_metrics(w0: "torch.Tensor", dw: "torch.Tensor", sd: "torch.Tensor") -> dict[str, float]:
    fro = float(sd.square().sum().sqrt())
    spec = float(sd[0]) if sd.numel() else 0.0
    return {
        "fro": fro,
        "rel_fro": fro / float(w0.norm()) if float(w0.norm()) > 0 else math.nan,
        "spectral": spec,
        "rank": numerical_rank(sd, dw.shape),
        "stable_rank": fro**2 / spec**2 if spec > 0 else 0.0,
        "effective_rank": effective_rank(sd),
    }


def _overlap_metrics(dw: "torch.Tensor", fro2: float, rank: int, vhd: "torch.Tensor", u0: "torch.Tensor",
                     vh0: "torch.Tensor", k: int, seed: int, n_random: int) -> dict[str, float]:
    d_out, d_in = dw.shape
    kk = min(k, u0.shape[1])
    uk, vk = u0[:, :kk], vh0[:kk].T
    out = {f"random_energy_left_k{k}": kk / d_out, f"random_energy_right_k{k}": kk / d_in,
           f"random_energy_two_k{k}": kk * kk / (d_out * d_in)}
    if rank == 0:
        nan_keys = [f"{x}_k{k}" for x in OVERLAP_METRICS] + [f"random_{x}_k{k}" for x in ("sim", "pa_max", "pa_mean")]
        return {**out, **{key: math.nan for key in nan_keys}}
    out[f"energy_left_k{k}"] = float((uk.T @ dw).square().sum()) / fro2
    out[f"energy_right_k{k}"] = float((dw @ vk).square().sum()) / fro2
    out[f"energy_two_k{k}"] = float((uk.T @ dw @ vk).square().sum()) / fro2
    vd = vhd[: min(rank, kk)].T
    out[f"sim_k{k}"], out[f"pa_max_k{k}"], out[f"pa_mean_k{k}"] = _subspace_overlap(vd, vk)
    rand = [_subspace_overlap(vd, q) for q in _random_bases(d_in, kk, n_random, seed + k)]
    for i, name in enumerate(("sim", "pa_max", "pa_mean")):
        out[f"random_{name}_k{k}"] = sum(r[i] for r in rand) / len(rand)
    return out


def weight_metrics(W0: "torch.Tensor", dW: "torch.Tensor", ks: Sequence[int] = KS, seed: int = 0, *,
                   svd0: tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"] | None = None,
                   n_random: int = N_RANDOM, intruder_m: int = INTRUDER_M,
                   intruder_threshold: float = INTRUDER_THRESHOLD) -> dict[str, float]:
    """Size, spectrum and W0-subspace overlap of an update dW (both out x in); see the module docstring.

    `svd0` is W0's reduced SVD (e.g. from SVDCache) to skip recomputing it.
    """
    import torch

    w0, dw = W0.double().cpu(), dW.double().cpu()
    if w0.shape != dw.shape:
        raise ValueError(f"W0 is {tuple(w0.shape)} but dW is {tuple(dw.shape)}")
    u0, _, vh0 = svd0 if svd0 is not None else torch.linalg.svd(w0, full_matrices=False)
    u0, vh0 = u0.double(), vh0.double()
    _, sd, vhd = torch.linalg.svd(dw, full_matrices=False)
    out: dict[str, float] = _size_metrics(w0, dw, sd)
    fro2 = out["fro"] ** 2
    for k in ks:
        out.update(_overlap_metrics(dw, fro2, int(out["rank"]), vhd, u0, vh0, int(k), seed, n_random))
    out["intruders"] = intruder_count(u0, w0 + dw, intruder_m, intruder_threshold)
    g = torch.randn(dw.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g * (out["fro"] / float(g.norm()))
    out["random_intruders"] = intruder_count(u0, w0 + g, intruder_m, intruder_threshold)
    return out


def overlap_keys(ks: Sequence[int] = KS) -> list[str]:
    """Every overlap metric key (each has a `random_` twin in weight_metrics' output)."""
    return [f"{x}_k{k}" for k in ks for x in OVERLAP_METRICS] + ["intruders"]


# ------------------------------------------------------------------------------------------ hidden states
def _messages(p: Any) -> list[dict[str, str]]:
    if hasattr(p, "chat"):
        return p.chat()
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    return list(p)


def _last_token_states(model: Any, tok: Any, prompts: Sequence[Any]) -> list["torch.Tensor"]:
    """Per prompt: (n_layers, hidden) float64 hidden states at the last prompt token, after each block."""
    import torch

    from ..data import prompt_ids

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([prompt_ids(tok, _messages(p))], device=device)
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0, -1] for h in hs[1:]]).double().cpu())
    return out


def hidden_shift(model: Any, tok: Any, prompts: Sequence[Any], base: Any = None) -> list[float]:
    """Per decoder layer: mean over prompts of ||h_patched - h_base|| / ||h_base|| at the last prompt token.

    `model` is a PeftModel (its base is run inside `model.disable_adapter()`), or any model with `base` given
    (e.g. a fully fine-tuned copy). Entry i is the output of block i (for Llama the last one is after the final norm).
    """
    if not prompts:
        return []
    if base is None:
        with model.disable_adapter():
            h0 = _last_token_states(model, tok, prompts)
    else:
        h0 = _last_token_states(base, tok, prompts)
    h1 = _last_token_states(model, tok, prompts)
    ratios = [((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)) for a, b in zip(h0, h1)]
    n = len(ratios)
    return [float(sum(r[i] for r in ratios) / n) for i in range(ratios[0].shape[0])]


def default_prompts(limit: int = 20) -> tuple[list[Any], list[Any]]:
    """(harmful, benign) records from the built-in dev splits, at most `limit` each."""
    from ..data import builtin_split

    return builtin_split("harmful", "dev")[:limit], builtin_split("benign", "dev")[:limit]


# ------------------------------------------------------------------------------------------ analysis
def update_records(model: Any, updates: dict[Key, "torch.Tensor"], ks: Sequence[int] = KS, seed: int = 0,
                   cache: SVDCache | None = None) -> list[dict[str, Any]]:
    """One record per update: layer, module, weight name, shape, and weight_metrics."""
    cache = cache or SVDCache(model)
    records = []
    for key in sorted(updates):
        w0 = base_weight(model, key)
        name = weight_name(model, key)
        dw = updates[key]
        if dw.shape != w0.shape:
            raise ValueError(f"{name}: update is {tuple(dw.shape)} but the base weight is {tuple(w0.shape)}")
        metrics = weight_metrics(w0, dw, ks, seed, svd0=cache.get(name, w0))
        records.append({"layer": key[0], "module": key[1], "weight": name, "d_out": w0.shape[0],
                        "d_in": w0.shape[1], **metrics})
    return records


def _clean(x: Any) -> Any:
    """NaN / inf -> None so the JSON stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _ratio(rec: dict[str, Any], metric: str) -> float:
    v, r = rec.get(metric), rec.get(f"random_{metric}")
    return v / r if isinstance(v, (int, float)) and r and math.isfinite(v) else math.nan


def _png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_overlap(records: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Layer x module heatmap of `metric` / `random_metric` (1 = chance level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r["layer"] for r in records})
    modules = sorted({r["module"] for r in records})
    grid = np.full((len(layers), len(modules)), np.nan)
    for r in records:
        grid[layers.index(r["layer"]), modules.index(r["module"])] = _ratio(r, metric)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 1.0 + 0.35 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"{metric} / random (1 = chance)")
    fig.colorbar(im, ax=ax)
    _png(fig, path)


def plot_shift(shift: dict[str, Any], path: Path) -> None:
    """Relative hidden-state shift per layer, benign vs harmful prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in (("benign", "o-"), ("harmful", "s-")):
        ys = shift.get(name) or []
        ax.plot(range(len(ys)), ys, style, label=f"{name} (n={shift.get(f'n_{name}', 0)})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean ||h_patched - h_base|| / ||h_base||")
    ax.set_title("hidden-state shift at the last prompt token")
    ax.legend()
    _png(fig, path)


def write_outputs(out_dir: str | Path, records: list[dict[str, Any]], shift: dict[str, Any] | None,
                  ks: Sequence[int]) -> Path:
    """DIR/geometry.json, DIR/overlap_heatmap.png and, with a shift, DIR/shift.json and DIR/shift.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "geometry.json", _clean(records))
    if records:
        plot_overlap(records, out / "overlap_heatmap.png", f"energy_right_k{max(ks)}")
    if shift is not None:
        atomic_write_json(out / "shift.json", _clean(shift))
        plot_shift(shift, out / "shift.png")
    return out


def _patch_updates(model: Any, patch: str | Path) -> dict[Key, "torch.Tensor"]:
    """LoRA updates, after checking a safetypatch patch's base fingerprint (plain PEFT adapters are read as is)."""
    from ..patches.artifact import PATCH_META, check_base, read_meta

    if (Path(patch) / PATCH_META).exists():
        check_base(read_meta(patch), model, patch)
    return lora_updates(patch)


def analyze_with_shift(model_spec: str, patch: str | Path | None = None, finetuned: str | Path | None = None,
                       ks: Sequence[int] = KS, out_dir: str | Path | None = None,
                       prompts_harmful: Sequence[Any] | None = None, prompts_benign: Sequence[Any] | None = None,
                       shift: bool = True, limit: int = 20, seed: int = 0
                       ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """analyze(), also returning the hidden-state shift ({'harmful': [...], 'benign': [...], ...} or None)."""
    from ..modeling.loading import load_model
    from ..patches.artifact import PATCH_META, load_patch

    if (patch is None) == (finetuned is None):
        raise ValueError("give exactly one of patch= (a LoRA patch dir) or finetuned= (a fine-tuned model)")
    model, tok = load_model(model_spec)
    ft = load_model(str(finetuned))[0] if finetuned is not None else None
    updates = _patch_updates(model, patch) if patch is not None else full_updates(model, ft)
    if not updates:
        log.warning("no weight differs from the base model; nothing to analyse")
    records = update_records(model, updates, ks, seed)
    shift_res = None
    if shift:
        harmful, benign = default_prompts(limit)
        harmful = list(prompts_harmful) if prompts_harmful is not None else harmful
        benign = list(prompts_benign) if prompts_benign is not None else benign
        if patch is not None:
            target = load_patch(model, patch, verify=(Path(patch) / PATCH_META).exists())
            base = None
        else:
            target, base = ft, model
        shift_res = {"harmful": hidden_shift(target, tok, harmful, base=base),
                     "benign": hidden_shift(target, tok, benign, base=base),
                     "n_harmful": len(harmful), "n_benign": len(benign)}
    if out_dir is not None:
        write_outputs(out_dir, records, shift_res, ks)
    return records, shift_res


def analyze(model_spec: str, patch: str | Path | None = None, finetuned: str | Path | None = None,
            ks: Sequence[int] = KS, out_dir: str | Path | None = None, prompts_harmful: Sequence[Any] | None = None,
            prompts_benign: Sequence[Any] | None = None, shift: bool = True, limit: int = 20,
            seed: int = 0) -> list[dict[str, Any]]:
    """Geometry records for a LoRA patch (`patch`) or a fully fine-tuned model (`finetuned`) on `model_spec`.

    With `out_dir`, writes geometry.json, overlap_heatmap.png and (unless shift=False) shift.json and shift.png.
    Prompts default to the built-in dev splits (`limit` each).
    """
    return analyze_with_shift(model_spec, patch, finetuned, ks, out_dir, prompts_harmful, prompts_benign,
                              shift, limit, seed)[0]


# ------------------------------------------------------------------------------------------ table
def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(records: list[dict[str, Any]], k: int | None = None) -> str:
    """Compact text table, one row per (layer, module); overlap columns at the largest k as value/random."""
    if not records:
        return "(no changed weights)"
    if k is None:
        ks = [int(m.group(1)) for key in records[0] if (m := re.fullmatch(r"sim_k(\d+)", key))]
        k = max(ks) if ks else 1
    head = (f"{'layer':>5} {'module':<18} {'||dW||':>9} {'rel':>8} {'srank':>6} {'erank':>6} "
            f"{f'sim@{k}':>11} {f'pa@{k}':>11} {f'Eleft@{k}':>13} {f'Eright@{k}':>13} {'intr':>5}")
    lines = [head, "-" * len(head)]
    for r in records:
        def pair(m: str, spec: str = ".2f") -> str:
            return f"{_fmt(r.get(m), spec)}/{_fmt(r.get('random_' + m), spec)}"
        lines.append(
            f"{r['layer']:>5} {r['module'][:18]:<18} {_fmt(r['fro'], '.3g'):>9} {_fmt(r['rel_fro'], '.2e'):>8} "
            f"{_fmt(r['stable_rank'], '.1f'):>6} {_fmt(r['effective_rank'], '.1f'):>6} {pair(f'sim_k{k}'):>11} "
            f"{pair(f'pa_mean_k{k}'):>11} {pair(f'energy_left_k{k}', '.3f'):>13} "
            f"{pair(f'energy_right_k{k}', '.3f'):>13} {r['intruders']:>2}/{r['random_intruders']:<2}")
    lines.append("value/random: random = same metric for a random subspace of the same size (chance level)")
    return "\n".join(lines)


def print_table(records: list[dict[str, Any]], k: int | None = None) -> None:
    """Print format_table(records)."""
    print(format_table(records, k))
