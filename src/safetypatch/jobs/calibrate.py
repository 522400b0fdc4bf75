"""The strength dial: sweep a patch's LoRA scale on dev prompts and pick the strongest that stays within an
over-refusal budget, without retraining.

A LoRA update is dW = s * (alpha / r) B A, so a patch's effect is dialled by multiplying PEFT's per-module
`scaling` by s in memory (no weights are rewritten per step). For each s the patched model answers the harmful and
benign dev prompts (greedy, a few tokens: the refusal decision is in the opening) and the keyword judge says which
answers refuse. s = 0 is the base model. The chosen s is the one with the highest harmful refusal among those whose
benign refusal is at most the base model's plus the budget (ties go to the smaller s).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.builtin import DEV_BENIGN, DEV_HARMFUL
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice
from ..io_utils import atomic_write_json, utc_now

DEFAULT_FACTORS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)


@dataclass
class CalibrationConfig:
    factors: tuple[float, ...] = field(default=DEFAULT_FACTORS, metadata={"help": "scale factors to try", "min": 0})
    max_over_refusal: float = field(default=0.05, metadata={
        "help": "benign refusal allowed above the base model's", "min": 0, "max": 1})
    dev_harmful: str = field(default=DEV_HARMFUL, metadata={"help": "harmful prompts"})
    dev_benign: str = field(default=DEV_BENIGN, metadata={"help": "benign prompts"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens generated per prompt", "min": 1})
    batch_size: int = field(default=16, metadata={"help": "generation batch size", "min": 1})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)

    def validate(self, where: str = "config") -> None:
        from ..config import check_numbers
        from ..errors import ConfigError

        check_numbers(self, where)
        check_choice(self.chat_template, where=where)
        if not any(f > 0 for f in self.factors):
            raise ConfigError(f"{where}: field 'factors' (--factors) needs a factor > 0 (0 is the base model), "
                              f"got {list(self.factors)}")


def choose_factor(curve: list[dict[str, float]], budget: float) -> dict[str, Any]:
    """The point of `curve` (dicts with factor, harmful_refusal, benign_refusal; factor 0 = base) to use."""
    base = next((p for p in curve if p["factor"] == 0.0), None)
    base_benign = base["benign_refusal"] if base else 0.0
    ok = [p for p in curve if p["factor"] > 0 and p["benign_refusal"] <= base_benign + budget + 1e-9]
    if not ok:
        return {"factor": 0.0, "within_budget": False, "base_benign_refusal": base_benign}
    best = max(ok, key=lambda p: (p["harmful_refusal"], -p["factor"]))
    return {**best, "within_budget": True, "base_benign_refusal": base_benign}


def set_scale(model: Any, factor: float, base_scaling: dict[str, dict[str, float]]) -> None:
    """Multiply every LoRA module's scaling by `factor` (relative to `base_scaling`, read once)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and name in base_scaling:
            for adapter, value in base_scaling[name].items():
                mod.scaling[adapter] = value * factor


def dev_prompts(cfg: CalibrationConfig) -> tuple[list[Any], list[Any]]:
    """The harmful and benign dev prompts (`training.dev_checks.dev_prompts`); DataError when either is empty."""
    from ..training.dev_checks import dev_prompts as read_dev_prompts

    return read_dev_prompts(cfg.dev_harmful, cfg.dev_benign)


def sweep(model: Any, tok: Any, cfg: CalibrationConfig, progress: bool = True,
          prompts: tuple[list[Any], list[Any]] | None = None) -> list[dict[str, float]]:
    """Refusal rates at each factor for a PeftModel with the patch attached (its scaling is restored after);
    `prompts` = (harmful, benign) records, default `dev_prompts(cfg)`."""
    from peft.tuners.lora import LoraLayer
    from tqdm.auto import tqdm

    from ..training.config import TrainConfig, bf16_autocast, use_bf16
    from ..training.dev_checks import refusal_rates

    harmful, benign = prompts or dev_prompts(cfg)
    base_scaling = {n: dict(m.scaling) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    device = next(model.parameters()).device.type
    bf16 = use_bf16(TrainConfig().bf16, device)  # the training recipe's setting ('auto': where bf16 is native)
    curve = []
    try:
        for factor in tqdm(sorted(set(cfg.factors) | {0.0}), desc="calibrating", disable=not progress):
            set_scale(model, factor, base_scaling)
            with bf16_autocast(device, bf16):
                rates = refusal_rates(model, tok, harmful, benign, cfg.max_new_tokens, batch_size=cfg.batch_size,
                                      progress=progress, desc=f"dev check (factor {factor:g})")
            curve.append({"factor": factor, **{k: round(v, 4) for k, v in rates.items()}})
    finally:
        set_scale(model, 1.0, base_scaling)
    return curve


def plot_curve(curve: list[dict[str, float]], chosen: dict[str, Any], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["factor"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [p["harmful_refusal"] for p in curve], "o-", label="harmful refusal (dev)")
    ax.plot(xs, [p["benign_refusal"] for p in curve], "s-", label="benign refusal (dev)")
    ax.axhline(chosen["base_benign_refusal"] + budget, color="grey", ls="--", lw=1, label="benign budget")
    if chosen["within_budget"]:
        ax.axvline(chosen["factor"], color="green", ls=":", label=f"chosen s = {chosen['factor']:g}")
    ax.set_xlabel("patch scale s")
    ax.set_ylabel("refusal rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("strength dial")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def calibrate(patch_dir: str | Path, model_spec: str = "default", cfg: CalibrationConfig | None = None,
              out_dir: str | Path | None = None, progress: bool = True,
              model_and_tok: tuple[Any, Any] | None = None, apply_to: str | Path | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Sweep, choose, and record the result under `calibration` in the patch's patch.json (weights untouched);
    with `out_dir`, also write calibration.json and calibration.png there; with `apply_to`, also write the patch
    scaled by the chosen factor there (only when a factor is within budget). Outputs that exist are refused
    before any generation unless `overwrite`."""
    from ..errors import OutputExistsError
    from ..evals.backend import warn_template_mismatch
    from ..modeling import load_model
    from ..patches import load_patch, record_calibration, scale_patch, verify_files

    cfg = cfg or CalibrationConfig()
    cfg.validate()
    verify_files(patch_dir)  # a missing or damaged patch fails before the model is loaded
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and not overwrite:
        taken = [f.name for f in (out / "calibration.json", out / "calibration.png") if f.exists()]
        if taken:
            raise OutputExistsError(f"{out} already holds {', '.join(taken)}; choose another --out or pass --overwrite")
    if apply_to is not None and Path(apply_to).exists() and not overwrite:
        raise OutputExistsError(f"{apply_to} already exists; choose another output for the scaled patch or pass "
                                "--overwrite")
    harmful, benign = dev_prompts(cfg)
    model, tok = model_and_tok or load_model(model_spec, chat_template=cfg.chat_template)
    peft_model = load_patch(model, patch_dir)
    warn_template_mismatch(patch_dir, tok)
    curve = sweep(peft_model, tok, cfg, progress=progress, prompts=(harmful, benign))
    peft_model.unload()  # leave a caller's model as it came
    chosen = choose_factor(curve, cfg.max_over_refusal)
    record = {"date": utc_now(), "chosen_factor": chosen["factor"], "within_budget": chosen["within_budget"],
              "budget": cfg.max_over_refusal, "base_benign_refusal": chosen["base_benign_refusal"],
              "curve": curve, "dev": {"harmful": cfg.dev_harmful, "n_harmful": len(harmful),
                                      "benign": cfg.dev_benign, "n_benign": len(benign)},
              "config": {**asdict(cfg), "factors": list(cfg.factors)}}
    if apply_to is not None and chosen["within_budget"]:
        scale_patch(patch_dir, chosen["factor"], apply_to, overwrite=overwrite)
        record["applied_to"] = str(apply_to)
    record_calibration(patch_dir, record)  # locked and atomic: concurrent certificate entries are kept
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "calibration.json", {"patch": str(patch_dir), **record})
        plot_curve(curve, chosen, cfg.max_over_refusal, out / "calibration.png")
    return record
