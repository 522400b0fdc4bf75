"""Metrics of one weight update dW against its base weight W0: size, spectrum, and overlap with W0's top singular
subspaces, each overlap next to its chance level.

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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

KS = (1, 8, 32)
OVERLAP_METRICS = ("sim", "pa_max", "pa_mean", "energy_left", "energy_right", "energy_two")
SIZE_METRICS = ("fro", "rel_fro", "spectral", "rank", "stable_rank", "effective_rank")
INTRUDER_M = 10
INTRUDER_THRESHOLD = 0.5
N_RANDOM = 5


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
