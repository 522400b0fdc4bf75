"""Module roles: `--target-modules mlp.up` instead of a per-architecture module name.

Roles are `mlp.up`, `mlp.gate`, `mlp.down`, `attn.q`, `attn.k`, `attn.v`, `attn.o`; groups are `mlp`, `attn` (their
roles) and `all-linear` (every linear module of the decoder layers). A role resolves to module names inside a
decoder layer: from ROLE_TABLE for the listed model types, else by the common naming conventions (CONVENTIONS)
matched against the linear modules the model's decoder layers really hold (attention roles only under a module
whose name says attention, MLP roles only outside one). Any other target is a raw module name, passed through once
it is checked to name a linear module of the layers.

A role that the architecture fuses into one matrix (Phi-3 `gate_up_proj`, GPT-NeoX `query_key_value`, GPT-2
`c_attn`) patches the whole fused module, and says so once. A resolved name is the bare leaf (`up_proj`) when no
other linear module of the layers has that leaf, else the qualified suffix (`mlp.c_proj`); both are PEFT
`target_modules` entries (matched as a suffix after a dot).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError
from .architecture import layer_stack

log = logging.getLogger(__name__)

ROLES = ("mlp.up", "mlp.gate", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")
GROUPS = {"mlp": ("mlp.up", "mlp.gate", "mlp.down"), "attn": ("attn.q", "attn.k", "attn.v", "attn.o"),
          "all-linear": ()}

_LLAMA = {"mlp.up": "mlp.up_proj", "mlp.gate": "mlp.gate_proj", "mlp.down": "mlp.down_proj",
          "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
          "attn.o": "self_attn.o_proj"}
_QKV = ("attn.q", "attn.k", "attn.v")
# model_type -> role -> module path inside a decoder layer (a role absent here does not exist in that architecture)
ROLE_TABLE: dict[str, dict[str, str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")},
    "phi3": {"mlp.up": "mlp.gate_up_proj", "mlp.gate": "mlp.gate_up_proj", "mlp.down": "mlp.down_proj",
             **{r: "self_attn.qkv_proj" for r in _QKV}, "attn.o": "self_attn.o_proj"},
    "gpt2": {"mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj", **{r: "attn.c_attn" for r in _QKV},
             "attn.o": "attn.c_proj"},
    "gpt_neox": {"mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h",
                 **{r: "attention.query_key_value" for r in _QKV}, "attn.o": "attention.dense"},
    "opt": {"mlp.up": "fc1", "mlp.down": "fc2", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj", "attn.o": "self_attn.out_proj"},
}
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")
FUSED_GATE_UP = ("gate_up_proj",)
# role -> leaf names, in order of preference (the first one the layers hold wins); fused modules last
CONVENTIONS: dict[str, tuple[str, ...]] = {
    "mlp.up": ("up_proj", "fc1", "c_fc", "fc_in", "dense_h_to_4h", "w3", "w1", *FUSED_GATE_UP),
    "mlp.gate": ("gate_proj", "w1", *FUSED_GATE_UP),
    "mlp.down": ("down_proj", "fc2", "c_proj", "fc_out", "dense_4h_to_h", "w2"),
    "attn.q": ("q_proj", "query", "wq", *FUSED_QKV),
    "attn.k": ("k_proj", "key", "wk", *FUSED_QKV),
    "attn.v": ("v_proj", "value", "wv", *FUSED_QKV),
    "attn.o": ("o_proj", "out_proj", "dense", "c_proj", "wo", "out"),
}
# a convention that holds only beside another module: w1 is the up projection only of an ungated w1 / w2 MLP
_ONLY_WITH = {("mlp.gate", "w1"): "w3"}
_ONLY_WITHOUT = {("mlp.up", "w1"): "w3"}
_ATTN_WORDS = ("attn", "attention")


@dataclass
class Resolution:
    """What `--target-modules` asked for and the module names PEFT gets: `resolved[request]` lists the names one
    request stands for (in `modules`, once each, in order); `notes` say which roles patch a fused module."""

    requested: list[str]
    resolved: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    conv1d: bool = False  # a resolved target is a transformers Conv1D (PEFT needs fan_in_fan_out=True)
    layers_path: str = ""  # the decoder-layer list (`model.layers`); its last part is PEFT's layers_pattern
    layer_modules: list[str] = field(default_factory=list)  # every linear module inside a decoder layer

    @property
    def modules(self) -> list[str]:
        out: list[str] = []
        for names in self.resolved.values():
            out.extend(n for n in names if n not in out)
        return out

    @property
    def layers_pattern(self) -> str:
        return self.layers_path.rsplit(".", 1)[-1]


def is_role(target: str) -> bool:
    return target in ROLES or target in GROUPS


def _is_linear(mod: Any) -> bool:
    import torch

    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def linear_modules(model: Any) -> tuple[str, dict[str, str]]:
    """(layer-stack path, {module path inside a decoder layer: class name}) over every decoder layer. A module
    wrapped by PEFT counts as its base layer; PEFT's own lora_A / lora_B are skipped."""
    path, layers = layer_stack(model)
    found: dict[str, str] = {}
    for layer in layers:
        for name, mod in layer.named_modules():
            parts = name.split(".")
            if not name or any(p.startswith("lora_") for p in parts) or not _is_linear(mod):
                continue
            if parts[-1] == "base_layer":
                name = ".".join(parts[:-1])
            found.setdefault(name, type(mod).__name__)
    return path, found


def _in_scope(role: str, name: str) -> bool:
    attn = any(w in part.lower() for part in name.split(".")[:-1] for w in _ATTN_WORDS)
    return attn if role.startswith("attn.") else not attn


def _by_convention(role: str, names: Sequence[str]) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    for leaf in CONVENTIONS[role]:
        if (need := _ONLY_WITH.get((role, leaf))) and need not in leaves:
            continue
        if (avoid := _ONLY_WITHOUT.get((role, leaf))) and avoid in leaves:
            continue
        hits = [n for n in names if n.rsplit(".", 1)[-1] == leaf and _in_scope(role, n)]
        if hits:
            return hits
    return []


def _role_paths(role: str, model_type: str, names: Sequence[str]) -> list[str]:
    """Module paths (inside a layer) of one role: the table's entry when the layers hold it, else conventions."""
    table = ROLE_TABLE.get(model_type)
    if table is not None and table.get(role) in names:
        return [table[role]]
    if table is not None and role not in table:
        return []  # the architecture has no such module (GPT-2 has no gate)
    return _by_convention(role, names)


def short_name(path: str, names: Sequence[str]) -> str:
    """The bare leaf when no other linear module of the layers has it, else the qualified path."""
    leaf = path.rsplit(".", 1)[-1]
    return leaf if sum(n.rsplit(".", 1)[-1] == leaf for n in names) == 1 else path


def _fused_roles(path: str, model_type: str) -> list[str]:
    table = ROLE_TABLE.get(model_type) or {}
    roles = [r for r, p in table.items() if p == path]
    leaf = path.rsplit(".", 1)[-1]
    if not roles and leaf in FUSED_QKV:
        roles = list(_QKV)
    elif not roles and leaf in FUSED_GATE_UP:
        roles = ["mlp.gate", "mlp.up"]
    return roles if len(roles) > 1 else []


def _fused_hint(target: str, names: Sequence[str]) -> str:
    """' (...)' when a raw name is one part of a module this architecture fuses (q_proj where qkv_proj exists):
    the fused matrix cannot be split into a patch of one part."""
    roles = [r for r, leaves in CONVENTIONS.items() if target in leaves[:3]]
    fused = [n for n in names if n.rsplit(".", 1)[-1] in (FUSED_QKV + FUSED_GATE_UP)
             and any(n in _by_convention(r, names) for r in roles)]
    if not fused:
        return ""
    return (f" ({target} is fused into {fused[0]} here, which cannot be split: patch the whole fused module with "
            f"role {roles[0]} or --target-modules {short_name(fused[0], names)})")


def _missing(target: str, model: Any, path: str, names: Sequence[str], why: str) -> ConfigError:
    from .compat import unwrap_lm

    cls = type(unwrap_lm(model)).__name__
    listing = ", ".join(sorted(names)) or "none"
    example = sorted(names)[0] if names else "NAME"
    return ConfigError(f"--target-modules / field 'target_modules': {why} in {cls} "
                       f"(model_type {getattr(model.config, 'model_type', None)!r}); each of its decoder layers "
                       f"({path}.N) holds the linear modules {listing}: give one or more of those with "
                       f"--target-modules (e.g. --target-modules {example}), or a role it has "
                       f"({', '.join(ROLES)}; groups mlp, attn, all-linear)")


def resolve_targets(model: Any, targets: Sequence[str]) -> Resolution:
    """Resolve `--target-modules` (roles, groups, raw module names) against `model`'s decoder layers.

    ConfigError naming the request, the model class and its linear modules (per decoder layer) when a role has no
    module or a raw name is no linear module of the layers. A role met by a fused module is logged once."""
    path, found = linear_modules(model)
    names = list(found)
    model_type = str(getattr(model.config, "model_type", "") or "")
    resolved: dict[str, list[str]] = {}
    fused_hits: dict[str, list[str]] = {}  # fused module path -> the requested roles it stands for
    for target in targets:
        if target == "all-linear":
            resolved[target] = [short_name(n, names) for n in names]
            continue
        if target in ROLES or target in GROUPS:
            paths: list[str] = []
            for role in GROUPS.get(target, (target,)):
                hits = _role_paths(role, model_type, names)
                if not hits and target in ROLES:
                    raise _missing(target, model, path, names, f"role '{target}' has no module")
                for p in hits:
                    if role in _fused_roles(p, model_type) and role not in fused_hits.setdefault(p, []):
                        fused_hits[p].append(role)
                paths.extend(p for p in hits if p not in paths)
            if not paths:
                raise _missing(target, model, path, names, f"group '{target}' has no module")
            resolved[target] = [short_name(p, names) for p in paths]
        elif any(n == target or n.endswith(f".{target}") for n in names):
            resolved[target] = [target]
        else:
            raise _missing(target, model, path, names, f"'{target}' is no role and no linear module"
                           + _fused_hint(target, names))
    notes = [f"{' and '.join(roles)} -> {p}, a fused module ({' + '.join(_fused_roles(p, model_type))} in one "
             "matrix): the whole fused module is patched" for p, roles in fused_hits.items()]
    res = Resolution(list(targets), resolved, notes, layers_path=path, layer_modules=names)
    res.conv1d = any(found[n] == "Conv1D" for n in names
                     if any(n == m or n.endswith(f".{m}") for m in res.modules))
    _log_once(res, model)
    return res


_LOGGED: set[str] = set()


def _log_once(res: Resolution, model: Any) -> None:
    if not res.notes:
        return
    from .compat import unwrap_lm

    line = f"{type(unwrap_lm(model)).__name__}: " + "; ".join(res.notes)
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.warning(line)
