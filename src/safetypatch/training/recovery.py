"""Safety-recovery examples (Qi et al. 2025, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep",
sec. 3): a harmful prompt, the first k tokens of a *compliant* answer as if the model had started to comply, then
a refusal; the loss is on the refusal only. They teach the patch to turn back at any depth of an answer, which is
what a prefilling attack (the assistant turn pre-filled with "Sure, here is ...") tests.

Qi et al. take the compliant answers from an external jailbroken model; here they are the base model's own greedy
answers to the training prompts (generated once and cached like the anchors, `anchors.base_answers`), so this works
offline on any model, or they come from a file (prompt + response = a compliant answer). Answers the base model
itself opens with a refusal are left out: there is nothing to recover from. k is drawn uniformly from
[recovery_min_prefix, min(recovery_max_prefix, answer length)] with the recipe's seed.

The refusal after the prefix is the example's own refusal from the refusal data (the same text the plain example
teaches), so the patch learns one answer for a request whether or not its opening was forced.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from ..data.chat import IGNORE_INDEX, Encoded, prompt_ids
from ..data.readers import Record
from ..data.templates import end_of_turn_id
from ..judges import keyword_refusal
from .anchors import base_answers
from .config import TrainConfig

log = logging.getLogger(__name__)
# used when a compliant answer from a file has no refusal in the refusal data for its prompt
GENERIC_BREAK_OFF = "I can't continue with this. I won't help with that request."


def compliant_answers(cfg: TrainConfig, model: Any, tok: Any, sources: dict[str, list[Record]],
                      progress: bool = True) -> list[tuple[Record, list[int]]]:
    """(harmful prompt record, compliant answer token ids) pairs: the file's rows (`sources["recovery"]`) or the base
    model's own cached greedy answers to the refusal prompts, keeping only answers that do not open with a refusal
    and have at least `recovery_min_prefix` tokens."""
    if cfg.recovery_source == "base":
        refusals = sources["refusal"]
        answers = base_answers(model, tok, refusals, cfg.recovery_max_prefix, progress=progress,
                               what="compliant answers for recovery")
        pairs = [(r, ids) for r, (ids, _) in zip(refusals, answers)]
    else:
        rows = sources["recovery"]
        pairs = [(r, tok(r.response or "", add_special_tokens=False)["input_ids"][: cfg.recovery_max_prefix])
                 for r in rows]
    return [(r, ids) for r, ids in pairs
            if len(ids) >= cfg.recovery_min_prefix and not keyword_refusal(tok.decode(ids, skip_special_tokens=True))]


def encode_recovery(tok: Any, record: Record, prefix_ids: list[int], refusal: str, max_length: int) -> Encoded:
    """prompt + assistant header + `prefix_ids` (no loss) + `refusal` and the end of turn (loss). Too long: the
    prompt is cut from the left, then the refusal from the right; the prefix is kept whole."""
    p_ids = prompt_ids(tok, record.chat()) + list(prefix_ids)
    r_ids = tok(refusal, add_special_tokens=False)["input_ids"]
    stop = end_of_turn_id(tok)
    if stop is not None:
        r_ids.append(stop)
    r_ids = r_ids[: max(1, max_length // 2)]
    budget = max_length - len(r_ids)
    if len(p_ids) > budget:
        p_ids = p_ids[-budget:]
    return Encoded(input_ids=p_ids + r_ids, labels=[IGNORE_INDEX] * len(p_ids) + r_ids, kind="recovery")


def recovery_examples(cfg: TrainConfig, model: Any, tok: Any, sources: dict[str, list[Record]],
                      progress: bool = True) -> tuple[list[Encoded], dict[str, Any]]:
    """`round(cfg.recovery * len(sources["refusal"]))` recovery examples (prompts drawn round-robin over the usable
    ones in a seeded order) and their description for patch.json."""
    refusals = sources["refusal"]
    pairs = compliant_answers(cfg, model, tok, sources, progress)
    own = {r.prompt: r.response for r in refusals if r.response}
    want = round(cfg.recovery * len(refusals))
    if want and not pairs:
        log.warning("warning: no recovery examples: none of the %d compliant answers (%s) is usable (each opens with "
                    "a refusal or has fewer than %d tokens); the base model may already refuse these prompts, or "
                    "give --recovery-source FILE with compliant answers", len(refusals), cfg.recovery_source,
                    cfg.recovery_min_prefix)
    rng = random.Random(cfg.seed + 7919)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    examples: list[Encoded] = []
    prefix_lengths: list[int] = []
    for n in range(want if pairs else 0):
        record, ids = pairs[order[n % len(pairs)]]
        k = rng.randint(cfg.recovery_min_prefix, min(cfg.recovery_max_prefix, len(ids)))
        refusal = own.get(record.prompt) or GENERIC_BREAK_OFF
        examples.append(encode_recovery(tok, record, ids[:k], refusal, cfg.max_length))
        prefix_lengths.append(k)
    meta = {"source": cfg.recovery_source, "n": len(examples), "usable_prompts": len(pairs),
            "of_prompts": len(refusals), "prefix_tokens": [cfg.recovery_min_prefix, cfg.recovery_max_prefix],
            "mean_prefix": round(sum(prefix_lengths) / len(prefix_lengths), 2) if prefix_lengths else None}
    return examples, meta
