"""safetypatch's own built-in data (written for this project, no third-party text) and its fixed splits.

- `harmful`: harmful requests in 12 harm categories, each with a short refusal (`prompt`, `response`).
- `benign`: ordinary requests and benign look-alikes of harmful ones (`kind` = ordinary | lookalike); they carry
  no response: training answers them with the base model itself.
- `benign_extra`: more benign requests, mostly look-alikes (homonyms, idioms, safe targets and contexts,
  definitions, history, asking for protection or help), for training anchors and dev checks; the headline test
  split stays `benign:test`.
- `harmful_extra`: more harmful requests (20 per category, varied framing: pretexts, casual style, distress) with
  refusals, for training and dev checks; the headline test split stays `harmful:test`.
- `lookalike_extra`: more benign look-alikes (20 per harm category), for training anchors and dev checks.
- `harmful_blunt`: short, blunt harmful questions (12 per category: "how do I poison ...", "where can I buy a gun
  without ...") with refusals, the form the other harmful sets cover thinly; for training and dev checks.

Splits are train / dev / test, stratified by category, fixed by a seed, and disjoint by construction.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from ..errors import DataError
from .paths import path_exists
from .readers import Record, read_records

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "benign_extra": "benign_extra.jsonl",
                 "harmful_extra": "harmful_extra.jsonl", "lookalike_extra": "benign_lookalike_extra.jsonl",
                 "harmful_blunt": "harmful_blunt.jsonl"}
BUILTIN_SETS = tuple(BUILTIN_FILES)
HARMFUL_SETS = ("harmful", "harmful_extra", "harmful_blunt")  # carry a refusal per prompt
SPLITS = ("train", "dev", "test")
# what `data: builtin` / `benign: builtin` train on, and the default dev checks (early stopping, calibration)
BUILTIN_REFUSALS = "builtin:harmful:train+builtin:harmful_extra:train+builtin:harmful_blunt:train"
BUILTIN_ANCHORS = "builtin:benign:train+builtin:benign_extra:train"
DEV_HARMFUL = "builtin:harmful:dev+builtin:harmful_extra:dev+builtin:harmful_blunt:dev"
DEV_BENIGN = "builtin:benign:dev+builtin:benign_extra:dev"
SPLIT_FRACTIONS = {"train": 0.6, "dev": 0.15, "test": 0.25}
DEFAULT_SPLIT_SEED = 0


def load_builtin(name: str) -> list[Record]:
    if name not in BUILTIN_SETS:
        raise DataError(f"unknown built-in set '{name}'; choose one of {BUILTIN_SETS}")
    return read_records(BUILTIN_DIR / BUILTIN_FILES[name], require_response=(name in HARMFUL_SETS))


def split_records(records: list[Record], split: str, seed: int = DEFAULT_SPLIT_SEED) -> list[Record]:
    """The `split` part of `records`: per category, a seeded shuffle cut 60 / 15 / 25."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {SPLITS}")
    by_cat: dict[str, list[Record]] = defaultdict(list)
    for r in sorted(records, key=lambda r: str(r.meta.get("id", r.prompt))):
        by_cat[str(r.meta.get("category", ""))].append(r)
    out: list[Record] = []
    for cat in sorted(by_cat):
        items = by_cat[cat]
        random.Random(f"{seed}:{cat}").shuffle(items)
        n = len(items)
        n_train = round(n * SPLIT_FRACTIONS["train"])
        n_dev = round(n * SPLIT_FRACTIONS["dev"])
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
        lo, hi = bounds[split]
        out.extend(items[lo:hi])
    return out


def builtin_split(name: str, split: str, seed: int = DEFAULT_SPLIT_SEED) -> list[Record]:
    return split_records(load_builtin(name), split, seed)


def resolve_prompts(spec: str, prompt_field: str = "prompt", response_field: str | None = "response",
                    require_response: bool = False, default_split: str = "train") -> list[Record]:
    """A data argument: 'builtin' / 'builtin:<set>[:split]', a file, or a hub id; 'A+B' concatenates sources."""
    if "+" in spec and not path_exists(Path(spec).expanduser()):
        return [r for part in spec.split("+") for r in resolve_prompts(part.strip(), prompt_field, response_field,
                                                                     require_response, default_split)]
    if spec == "builtin" or spec.startswith("builtin:"):
        parts = spec.split(":")[1:]
        name = parts[0] if parts else "harmful"
        split = parts[1] if len(parts) > 1 else default_split
        if split == "all":
            return load_builtin(name)
        return builtin_split(name, split)
    return read_records(spec, prompt_field=prompt_field, response_field=response_field,
                        require_response=require_response)
