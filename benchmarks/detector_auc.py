"""How well does a patch's initial A direction tell harmful from benign prompts, layer by layer?

For every decoder layer's up_proj input (post-norm hidden state at the last 5 prompt tokens), fit the detector
direction on the built-in *train* splits (diff-of-means, and Fisher LDA), then score the built-in *dev* prompts by
their projection and print the held-out ROC AUC per layer. This is the measurement behind `init=lda`.

    python benchmarks/detector_auc.py
"""

from __future__ import annotations

import sys

import torch

from safetypatch.config import PatchShape
from safetypatch.training.lora_init import contrast_init, lora_modules
from safetypatch.data import builtin_split
from safetypatch.data.chat import prompt_ids
from safetypatch.modeling import load_model
from safetypatch.patches import attach_new_patch


def projections(model, tok, records, modules, tail: int = 5) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {n: [] for n in modules}
    hooks = []
    for name, mod in modules.items():
        def hook(_m, args, name=name, mod=mod):
            x = args[0][:, -tail:, :].float()
            out[name].extend((x @ mod.lora_A["default"].weight[0]).mean(1).tolist())
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for r in records:
            with torch.no_grad():
                model(input_ids=torch.tensor([prompt_ids(tok, r.chat())]))
    finally:
        for h in hooks:
            h.remove()
    return out


def auc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def main() -> int:
    model, tok = load_model("default")
    model = attach_new_patch(model, PatchShape(rank=1, target_modules=["up_proj"], layers="all"))
    modules = lora_modules(model)
    order = sorted(modules, key=lambda n: int(n.split("layers.")[1].split(".")[0]))
    h_train, b_train = builtin_split("harmful", "train"), builtin_split("benign", "train")
    h_dev, b_dev = builtin_split("harmful", "dev"), builtin_split("benign", "dev")
    print("held-out ROC AUC of the detector direction, per layer (built-in dev splits)")
    for lda in (False, True):
        contrast_init(model, tok, h_train, b_train, lda=lda)
        ph, pb = projections(model, tok, h_dev, modules), projections(model, tok, b_dev, modules)
        scores = [auc(ph[n], pb[n]) for n in order]
        label = "fisher-lda" if lda else "diff-of-means"
        print(f"{label:>14}: " + " ".join(f"{i}:{s:.2f}" for i, s in enumerate(scores)))
        print(f"{'':>14}  mean over layers {sum(scores) / len(scores):.3f}, middle third "
              f"{sum(scores[10:20]) / 10:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
