"""Patches: the artifact (a PEFT adapter directory plus `patch.json`: save, read, verify, load, the certificate),
exact operations on adapters (deltas, stack, scale), merging into and out of a base model, orthogonal projection
and export (PEFT for vLLM, GGUF for llama.cpp).

Import from here (`from ..patches import load_patch`), not from the modules. Nothing heavy at module level.
"""

from .artifact import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PATCH_META, attach_new_patch, check_adapter_dir, check_base,
                       load_patch, lora_config, patch_info, read_meta, read_weights, record_calibration,
                       record_evaluation, save_patch, shape_record, update_meta, verify_files)
from .export import export_gguf, export_peft
from .merge import apply_patch, merge_into, unmerge, unmerge_patch
from .ops import delta_weights, lora_deltas, read_adapter, scale_patch, stack_patches
from .projection import SIDES, project_patch, project_update
from .schema import check_adapter_config, check_meta, read_adapter_config

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PATCH_META", "SIDES", "apply_patch", "attach_new_patch",
           "check_adapter_config", "check_adapter_dir", "check_base", "check_meta", "delta_weights", "export_gguf",
           "export_peft", "load_patch", "lora_config", "lora_deltas", "merge_into", "patch_info", "project_patch",
           "project_update", "read_adapter", "read_adapter_config", "read_meta", "read_weights",
           "record_calibration", "record_evaluation", "save_patch", "scale_patch", "shape_record", "stack_patches",
           "unmerge", "unmerge_patch", "update_meta", "verify_files"]
