"""Benign anchors: benign prompts answered by the base model itself, so training can hold their behaviour fixed.

The answers are greedy, cut at `max_tokens`, and cached per (base-model fingerprint, prompts, length) under
`$SAFETYPATCH_HOME/anchors/` so a second training run on the same base skips the generation.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..config import GenerationConfig, safetypatch_home
from ..data.readers import Record
from ..io_utils import atomic_write_text, sha256_text
from ..modeling import fingerprint, fingerprint_id, generate, variant


def base_answers(model: Any, tok: Any, records: list[Record], max_tokens: int, batch_size: int = 64,
                 cache: bool = True, progress: bool = True, what: str = "anchor answers"
                 ) -> list[tuple[list[int], bool]]:
    """(answer token ids, finished) of the base model for each record, from cache when possible. A PEFT model
    answers with its adapter switched off (and is fingerprinted by its base weights), so a patched model may be
    passed. With `progress`, the generation shows a bar named `what` and a cache hit one line (stderr)."""
    key = sha256_text(fingerprint_id(fingerprint(model)), str(max_tokens),
                      *(json.dumps(r.chat(), sort_keys=True) for r in records))[:24]
    path = safetypatch_home() / "anchors" / f"{key}.jsonl"
    if cache and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) == len(records):
            if progress:
                print(f"{what}: {len(rows)} loaded from the cache", file=sys.stderr, flush=True)
            return [(r["ids"], r["finished"]) for r in rows]
    with variant(model, "base") as base:
        gens = generate(base, tok, [r.chat() for r in records],
                        GenerationConfig(max_new_tokens=max_tokens, batch_size=batch_size),
                        desc=f"{what} (base model, max {max_tokens} tokens)", progress=progress)
    if cache:
        atomic_write_text(path, "".join(json.dumps({"prompt": r.prompt, "ids": g.token_ids, "finished": g.finished,
                                                    "text": g.text}) + "\n" for r, g in zip(records, gens)))
    return [(g.token_ids, g.finished) for g in gens]
