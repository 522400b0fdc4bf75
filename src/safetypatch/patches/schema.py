"""The shapes of a patch's two JSON files, checked wherever they are read: patch.json (`check_meta`) and PEFT's
adapter_config.json (`check_adapter_config`, `check_fits` against the weights). Valid JSON of the wrong shape (a
string where an object goes, a negative rank, a NaN alpha) is a PatchError naming the file and the field, never an
AttributeError deep inside a command.

A field is named by its path: `weights.sha256`, `evaluations[].refusal.*.*` (`[]` every list item, `*` every value
of an object). Fields not listed are free; a listed field may be absent unless it is required.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import PatchError

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
FIX = "the file is damaged or was edited by hand: restore it from a copy, or re-create the patch"

Check = tuple[str, Callable[[Any], bool]]  # (what it must be, in words; the test)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check: Check) -> Check:
    return f"{check[0]} or null", lambda v: v is None or check[1](v)


STR: Check = ("a string", lambda v: isinstance(v, str))
OBJ: Check = ("an object", lambda v: isinstance(v, dict))
LIST: Check = ("a list", lambda v: isinstance(v, list))
BOOL: Check = ("true or false", lambda v: isinstance(v, bool))
NUM: Check = ("a finite number", _num)
INT: Check = ("an integer", _int)
COUNT: Check = ("an integer >= 0", lambda v: _int(v) and v >= 0)
POSITIVE: Check = ("an integer >= 1", lambda v: _int(v) and v >= 1)
SHA256: Check = ("64 hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
STRS: Check = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
COUNTS: Check = ("a list of integers >= 0", lambda v: isinstance(v, list) and all(_int(x) and x >= 0 for x in v))
LAYERS: Check = ("a list of layer numbers or a layer selection string",
                 lambda v: isinstance(v, str) or COUNTS[1](v))

META: dict[str, Check] = {
    "format": STR, "created": STR, "safetypatch_version": STR,
    "weights": OBJ, "weights.sha256": SHA256, "weights.file": STR, "weights.bytes": COUNT, "weights.dtype": STR,
    "base_model": OBJ, "base_model.spec": _opt(STR), "base_model.fingerprint": OBJ,
    "base_model.fingerprint.fingerprint_version": INT, "base_model.fingerprint.num_layers": COUNT,
    "base_model.fingerprint.weights_sha256": STR, "base_model.fingerprint.shapes_sha256": STR,
    "base_model.fingerprint.architecture": _opt(STR), "base_model.fingerprint.model_type": _opt(STR),
    "base_model.fingerprint.hidden_size": _opt(INT), "base_model.fingerprint.vocab_size": _opt(INT),
    "shape": OBJ, "shape.rank": POSITIVE, "shape.alpha": NUM, "shape.target_modules": STRS, "shape.layers": LAYERS,
    "shape.resolved_modules": OBJ, "shape.resolved_modules.*": STRS,
    "training": OBJ, "recipe": OBJ, "data": OBJ,
    "chat_template": OBJ, "chat_template.name": STR, "chat_template.sha256": SHA256,
    "evaluations": LIST, "evaluations[]": OBJ, "evaluations[].date": STR, "evaluations[].suite": STR,
    "evaluations[].n": _opt(COUNT), "evaluations[].refusal": OBJ, "evaluations[].refusal.*": OBJ,
    "evaluations[].refusal.*.*": _opt(NUM),
    "calibration": _opt(OBJ), "calibration.date": STR, "calibration.chosen_factor": NUM,
    "calibration.within_budget": BOOL, "calibration.budget": NUM, "calibration.base_benign_refusal": NUM,
    "calibration.curve": LIST, "calibration.curve[]": OBJ, "calibration.curve[].factor": NUM,
    "calibration.curve[].harmful_refusal": NUM, "calibration.curve[].benign_refusal": NUM,
    "stack": LIST, "stack[]": OBJ, "stack[].path": STR, "stack[].sha256": STR, "stack[].weight": NUM,
    "scaled_from": OBJ, "derived_from": OBJ, "factor": NUM,
}
META_REQUIRED = ("weights", "weights.sha256")
CALIBRATION_REQUIRED = ("date", "chosen_factor", "within_budget", "budget", "base_benign_refusal", "curve")

ADAPTER: dict[str, Check] = {
    "peft_type": STR, "r": POSITIVE, "lora_alpha": NUM, "lora_dropout": ("a number in [0, 1)",
                                                                         lambda v: _num(v) and 0 <= v < 1),
    "target_modules": ("a list of module names or a regular expression", lambda v: isinstance(v, str) or STRS[1](v)),
    "layers_to_transform": ("null, a layer number or a list of them", lambda v: v is None or COUNT[1](v)
                            or COUNTS[1](v)),
    "layers_pattern": ("null, a string or a list of strings", lambda v: v is None or isinstance(v, str) or STRS[1](v)),
    "rank_pattern": _opt(OBJ), "rank_pattern.*": POSITIVE, "alpha_pattern": _opt(OBJ), "alpha_pattern.*": NUM,
    "use_rslora": BOOL, "use_dora": BOOL, "fan_in_fan_out": BOOL, "inference_mode": BOOL, "lora_bias": BOOL,
    "bias": ("one of none, all, lora_only", lambda v: v in ("none", "all", "lora_only")),
    "modules_to_save": _opt(STRS), "task_type": _opt(STR), "base_model_name_or_path": _opt(STR),
}
ADAPTER_REQUIRED = ("r",)


def _at(obj: Any, parts: list[str], name: str) -> Iterator[tuple[str, Any]]:
    """(concrete field name, value) for every value at the path `parts` inside `obj` (absent ones skipped)."""
    if not parts:
        yield name, obj
        return
    head, rest = parts[0], parts[1:]
    if head == "[]":
        for i, v in enumerate(obj if isinstance(obj, list) else []):
            yield from _at(v, rest, f"{name}[{i}]")
    elif head == "*":
        for k, v in (obj.items() if isinstance(obj, dict) else []):
            yield from _at(v, rest, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, dict) and head in obj:
        yield from _at(obj[head], rest, f"{name}.{head}" if name else head)


def _parts(path: str) -> list[str]:
    return [p for p in re.split(r"\.|(\[\])", path) if p]


def _shown(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, float) else repr(v)
    return (text[:60] + "...") if len(text) > 60 else text


def check_fields(obj: Any, schema: Mapping[str, Check], required: tuple[str, ...], where: str) -> None:
    """PatchError naming the first field of `obj` that is missing (when required) or is not what `schema` says."""
    if not isinstance(obj, dict):
        raise PatchError(f"{where}: must hold a JSON object, got {_shown(obj)}; {FIX}")
    for path, (want, test) in schema.items():
        for name, value in _at(obj, _parts(path), ""):
            if not test(value):
                raise PatchError(f"{where}: field '{name}' must be {want}, got {_shown(value)}; {FIX}")
    for path in required:
        if not any(True for _ in _at(obj, _parts(path), "")):
            raise PatchError(f"{where}: no field '{path}'; {FIX}")


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """patch.json's fields have the shapes safetypatch reads them with; returns `meta`."""
    check_fields(meta, META, META_REQUIRED, where)
    if isinstance(meta.get("calibration"), dict):
        check_fields(meta["calibration"], {}, CALIBRATION_REQUIRED, f"{where} (calibration)")
    return meta


def parse_json(data: bytes, where: Path | str) -> Any:
    """JSON from a file's bytes; PatchError naming the file for bytes that are not UTF-8 JSON."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise PatchError(f"{where}: damaged (not UTF-8 text: byte {e.start}); {FIX}") from None
    except json.JSONDecodeError as e:
        raise PatchError(f"{where}: damaged ({e.msg} at line {e.lineno}); {FIX}") from None
    except RecursionError:
        raise PatchError(f"{where}: damaged (nested too deeply); {FIX}") from None


def read_json_file(path: Path) -> Any:
    try:
        return parse_json(path.read_bytes(), path)
    except IsADirectoryError:
        raise PatchError(f"{path}: is a directory, not a file; {FIX}") from None


# ------------------------------------------------------------------------------------------------ adapter_config
def check_adapter_config(config: Any, where: str) -> dict[str, Any]:
    """adapter_config.json's fields have the shapes PEFT and safetypatch read; returns `config`."""
    check_fields(config, ADAPTER, ADAPTER_REQUIRED, where)
    for name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(name) or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise PatchError(f"{where}: field '{name}' has a key that is not a regular expression ({key!r}: "
                                 f"{e}); {FIX}") from None
    if isinstance(config.get("target_modules"), str):
        try:
            re.compile(config["target_modules"])
        except re.error as e:
            raise PatchError(f"{where}: field 'target_modules' is not a regular expression ({e}); {FIX}") from None
    return config


PEFT_FEATURES = {  # adapter_config fields that switch on what a plain LoRA patch (dW = scale * B @ A) is not
    "use_dora": "DoRA", "lora_bias": "LoRA bias", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA", "alora_invocation_tokens": "aLoRA", "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow", "kasa_config": "KaSA", "layer_replication": "layer replication",
    "megatron_config": "Megatron layers", "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters", "modules_to_save": "modules_to_save",
}


def check_plain_lora(config: Mapping[str, Any], where: str) -> None:
    """PatchError unless `config` is a plain LoRA adapter, the only kind safetypatch loads and operates on."""
    if config.get("peft_type", "LORA") != "LORA":
        raise PatchError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA; safetypatch handles LoRA "
                         "patches only")
    for name, what in PEFT_FEATURES.items():
        if config.get(name):
            raise PatchError(f"{where}: uses PEFT's {what} ({name}={_shown(config[name])}); safetypatch handles plain "
                             "LoRA patches only (their update is scale * B @ A)")
    if config.get("bias", "none") != "none":
        raise PatchError(f"{where}: adapters that train biases (bias={config.get('bias')!r}) are not supported")
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        raise PatchError(f"{where}: init_lora_weights {_shown(init)}: PEFT would run that initialisation on load "
                         "(some change the base weights); a saved patch has true, false or \"gaussian\"")


def read_adapter_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, parsed and checked (PatchError naming the file and field when damaged)."""
    return check_adapter_config(read_json_file(path), str(path))


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: Mapping[str, Any], module: str, rank: int | None = None) -> float:
    """The LoRA scale of one module: alpha / r (alpha / sqrt(r) with rslora), honoring rank / alpha patterns."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if rank is not None and rank != r:
        raise PatchError(f"module {module}: adapter_config says rank {r} but lora_A has {rank} rows; the adapter "
                         "config does not match the weights (damaged or edited): restore the patch from a copy")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def check_fits(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """The adapter config agrees with the weights (`shapes`: tensor name -> shape): each module's lora_A has the
    rank the config gives it and lora_B fits it; PatchError (damaged) otherwise."""
    for key, shape in shapes.items():
        m = LORA_KEY.match(key)
        if not m or m["ab"] != "A":
            continue
        module = m["module"]
        b = shapes.get(key[: m.start("ab")] + "B" + key[m.end("ab"):])
        if len(shape) != 2 or (b is not None and (len(b) != 2 or b[1] != shape[0])):
            raise PatchError(f"{where}: module {module}: lora_A {tuple(shape)} and lora_B {b and tuple(b)} do not "
                             f"fit together; {FIX}")
        try:
            module_scale(config, module, shape[0])
        except PatchError as e:
            raise PatchError(f"{where}: {e}") from None
