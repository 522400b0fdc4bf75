"""Evaluation suites: a named list of safety and utility measurements, described as YAML (tasks as data).

    safetypatch eval --suite quick --model default --patch P --out DIR

- `schema`: the suite file (`load_suite`, `list_suites`), checked entry by entry against its type's fields;
- `entry`: the registry of entry types (`ENTRY_TYPES`, `register_entry_type`) and what they share;
- `entries/`: one module per entry type: `safety`, `prefill`, `kl`, `mc`, `gsm8k`, `perplexity` (a new metric is one
  `SuiteEntry` subclass in one new module there);
- `prepare`: a run's settings (`SuiteRunConfig`) and loading every entry's data;
- `report`: differences, nested results, the text table. The run itself is `safetypatch.jobs.suite.run_suite`.

Relative data paths, and the published files of registered benchmarks, are looked up under the data root
(`--data-root`, else `$SAFETYPATCH_DATA`; a directory laid out like the project's `../shared/data`). An entry whose
file is missing is skipped with a note in the table and in summary.json; nothing is fetched from the hub. Built-in
sets always work. A judge given as `{name: llamaguard, optional: true}` is skipped with a note when it is not
available (not registered, or a model-based judge without `--judge-model`).

Base and patched are the same loaded model (the patch switched off / on), generated with one length-sorted
batch list per variant; identical prompts across entries are generated once.
"""

from .entry import (ENTRY_TYPES, SAMPLING, JudgeSpec, LoadContext, Measured, Prepared, RunContext, SuiteEntry,
                    chat_key, data_path, default_data_root, register_entry_type, select)
from .entries import GSM8KEntry, KLEntry, MCEntry, PerplexityEntry, PrefillEntry, PromptEntry, SafetyEntry
from .judging import SAFE_RATE_JUDGES, build_judges, usable_judge
from .prepare import SuiteRunConfig, drop_unpaired, generation_config, prepare
from .report import RATE_METRICS, add_differences, format_table, nest
from .schema import SUITES_DIR, Suite, list_suites, load_suite, parse_entry, suite_path

__all__ = ["ENTRY_TYPES", "RATE_METRICS", "SAFE_RATE_JUDGES", "SAMPLING", "SUITES_DIR", "GSM8KEntry", "JudgeSpec",
           "KLEntry", "LoadContext", "MCEntry", "Measured", "PerplexityEntry", "PrefillEntry", "Prepared",
           "PromptEntry", "RunContext", "SafetyEntry", "Suite", "SuiteEntry", "SuiteRunConfig", "add_differences", "build_judges", "chat_key",
           "data_path", "default_data_root", "drop_unpaired", "format_table", "generation_config", "list_suites",
           "load_suite", "nest", "parse_entry", "prepare", "register_entry_type", "select", "suite_path",
           "usable_judge"]
