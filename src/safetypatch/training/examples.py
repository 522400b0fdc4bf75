"""Training examples and batches: refusals, benign anchors answered by the base model itself, and optional mixed
general data, tokenized with response-only labels; shuffled (optionally length-grouped) index batches; right-padded
collation."""

from __future__ import annotations

import json
import random
from typing import Any

from ..data.builtin import BUILTIN_ANCHORS, BUILTIN_REFUSALS, resolve_prompts
from ..data.chat import IGNORE_INDEX, Encoded, encode_example
from ..data.readers import Record, read_records
from ..io_utils import sha256_text
from .anchors import base_answers
from .config import TrainConfig
from .recovery import recovery_examples


def records_hash(records: list[Record]) -> str:
    """sha256 of the records' chats and responses (what patch.json records as the data's identity)."""
    return sha256_text(*(json.dumps([r.chat(), r.response], sort_keys=True) for r in records))


def read_sources(cfg: TrainConfig) -> dict[str, list[Record]]:
    """The recipe's data, read and checked (a bad file or row is a DataError naming it): "refusal" (prompt +
    response), "anchor" (benign prompts; empty with benign 'none'), "mix" (general data; empty without mixing), "recovery" (compliant answers from a file; empty
    with recovery off or from the base model)."""
    data = BUILTIN_REFUSALS if cfg.data == "builtin" else cfg.data
    sources: dict[str, list[Record]] = {
        "refusal": resolve_prompts(data, cfg.prompt_field, cfg.response_field, require_response=True),
        "anchor": [], "mix": [], "recovery": []}
    if cfg.recovery > 0 and cfg.recovery_source != "base":
        sources["recovery"] = read_records(cfg.recovery_source, cfg.prompt_field, cfg.response_field,
                                           require_response=True)
    if cfg.benign and cfg.benign.lower() != "none":
        sources["anchor"] = resolve_prompts(BUILTIN_ANCHORS if cfg.benign == "builtin" else cfg.benign,
                                            cfg.prompt_field, None)
    if cfg.mix and cfg.mix_ratio > 0:
        sources["mix"] = read_records(cfg.mix, cfg.mix_prompt_field or cfg.prompt_field,
                                      cfg.mix_response_field or cfg.response_field, require_response=True)
    return sources


def build_examples(cfg: TrainConfig, model: Any, tok: Any, progress: bool = True
                   ) -> tuple[list[Encoded], dict[str, Any], dict[str, list[Record]]]:
    """Tokenized training examples (refusals, recovery examples, anchors, mixed data), a description with data
    hashes, and the source records by kind (`read_sources`). `progress`: the generation bars (tokenizing is quick)."""
    sources = read_sources(cfg)
    refusals = sources["refusal"]
    examples = [encode_example(tok, r.chat(), r.response or "", cfg.max_length, kind="refusal") for r in refusals]
    meta: dict[str, Any] = {"refusal": {"source": BUILTIN_REFUSALS if cfg.data == "builtin" else cfg.data,
                                        "n": len(refusals), "sha256": records_hash(refusals)}}
    if cfg.recovery > 0:
        recovery, meta["recovery"] = recovery_examples(cfg, model, tok, sources, progress=progress)
        examples += recovery
    if sources["anchor"]:
        benign = sources["anchor"]
        answers = base_answers(model, tok, benign, cfg.anchor_tokens, progress=progress)
        for r, (ids, finished) in zip(benign, answers):
            if ids:
                examples.append(encode_example(tok, r.chat(), ids, cfg.max_length, kind="anchor", close_turn=finished))
        meta["anchors"] = {"source": BUILTIN_ANCHORS if cfg.benign == "builtin" else cfg.benign, "n": len(benign),
                           "sha256": records_hash(benign), "answer_tokens": cfg.anchor_tokens,
                           "answered_by": "base model (greedy)"}
    if sources["mix"]:
        mix = sources["mix"]
        n_mix = round(cfg.mix_ratio / (1 - cfg.mix_ratio) * len(examples))
        rng = random.Random(cfg.seed)
        chosen = [mix[rng.randrange(len(mix))] for _ in range(n_mix)] if n_mix > len(mix) else rng.sample(mix, n_mix)
        examples += [encode_example(tok, r.chat(), r.response or "", cfg.max_length, kind="mix") for r in chosen]
        meta["mix"] = {"source": cfg.mix, "n": n_mix, "ratio": cfg.mix_ratio, "sha256": records_hash(chosen)}
    return examples, meta, sources


def batches(examples: list[Encoded], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Index batches for one epoch: shuffled; with grouping, similar lengths share a batch (less padding)."""
    rng = random.Random(seed * 1000 + epoch)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * 16
        idx = [i for m in range(0, len(idx), mega)
               for i in sorted(idx[m: m + mega], key=lambda j: -len(examples[j].input_ids))]
    out = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(out)
    return out


def collate(examples: list[Encoded], idx: list[int], pad_id: int, prefix: Any = None) -> dict[str, Any]:
    """Right-padded batch; with an active `prefix` (a speed.PrefixCache), also the cached hidden states of the
    frozen bottom layers."""
    import torch

    width = max(len(examples[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    weight_kind = torch.zeros((len(idx),), dtype=torch.long)  # 0 = refusal / mix, 1 = anchor
    for row, i in enumerate(idx):
        e = examples[i]
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attn[row, :n] = 1
        weight_kind[row] = 1 if e.kind == "anchor" else 0
    out = {"input_ids": ids, "labels": labels, "attention_mask": attn, "is_anchor": weight_kind}
    if prefix is not None and prefix.active:
        out["prefix_hidden"] = prefix.batch(idx, width)
    return out
