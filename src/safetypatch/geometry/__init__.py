"""Geometry: where a patch's (or a full fine-tune's) weight updates dW lie relative to the base weights W0
(subspace overlap, principal angles, energy, intruder dimensions), the hidden-state shift, and tables / plots of it.

    updates.py   dW per (layer, module): from a LoRA patch or a fully fine-tuned model; the base weight W0
    metrics.py   size, spectrum and W0-subspace overlap of one dW, each next to its chance level (the math)
    shift.py     hidden-state shift at the last prompt token, per layer
    report.py    geometry.json / shift.json, the heatmap and shift plots, the text table
    analysis.py  the whole analysis of a patch or a fine-tuned model

Import from here (`from ..geometry import analyze_with_shift, format_table`), not from the modules.
Nothing heavy at module level.
"""

from .analysis import analyze, analyze_with_shift, update_records
from .metrics import KS, overlap_keys, weight_metrics
from .report import format_table, print_table, write_outputs
from .shift import hidden_shift
from .updates import full_updates, lora_updates, patch_updates

__all__ = ["KS", "analyze", "analyze_with_shift", "format_table", "full_updates", "hidden_shift", "lora_updates",
           "overlap_keys", "patch_updates", "print_table", "update_records", "weight_metrics", "write_outputs"]
