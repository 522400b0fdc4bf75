"""The suite entry types, one module each, registered in `ENTRY_TYPES` by importing them here: the built-in ones in
the order the suite file's errors list them, then any other module of this folder (a new entry type is one new
file here; see `gsm8k.py` for a generation metric, `mc.py` for a log-likelihood one)."""

import importlib
import pkgutil

from .safety import SafetyEntry
from .kl import KLEntry
from .mc import MCEntry
from .gsm8k import GSM8KEntry
from .perplexity import PerplexityEntry
from .prompts import PromptEntry
from .prefill import PrefillEntry

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GSM8KEntry", "KLEntry", "MCEntry", "PerplexityEntry", "PrefillEntry", "PromptEntry", "SafetyEntry"]
