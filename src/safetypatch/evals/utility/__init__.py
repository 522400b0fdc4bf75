"""Utility metrics: what a safety patch costs on ordinary tasks.

- `mc`: multiple-choice accuracy by the log-likelihood of each choice's continuation (lm-evaluation-harness
  style): MMLU (`letter` style: the choices are listed, the continuation is " A" / " B" / ...) and ARC-like JSONL
  (`text` style: the continuation is the choice text; also length-normalised accuracy);
- `gsm8k`: exact match: the gold answer follows "####"; the prediction is the last number in the generation;
- `perplexity`: perplexity on a text set;
- `kl`: KL(base || patched) per token, teacher-forced on the base model's own greedy answers to benign prompts;
- `data`: the loaders (MMLU CSVs, multiple-choice JSONL, GSM8K JSONL, texts).

Every measurement runs through a backend (`modeling.backends`: `loglikelihood`, `loglikelihood_rolling`,
`generate`, `kl_to_base`) on one variant, "base" (the patch switched off) or "patched". Prompts are scored as raw
text (no chat template), as lm-evaluation-harness does by default; GSM8K and KL use the chat template, since they
are about the assistant's answers.
"""

from .data import (LETTERS, GSMItem, MCItem, gold_answer, load_gsm8k, load_mc_jsonl, load_mmlu, load_texts,
                   normalize_number)
from .gsm8k import GSM8K_INSTRUCTION, GSMResult, extract_answer, gsm8k_chat, gsm8k_exact_match, score_gsm8k
from .kl import KLResult, kl_to_base, measure_kl
from .mc import MCResult, mc_accuracy, mc_context
from .perplexity import PPLResult, perplexity

__all__ = ["GSM8K_INSTRUCTION", "LETTERS", "GSMItem", "GSMResult", "KLResult", "MCItem", "MCResult", "PPLResult",
           "extract_answer", "gold_answer", "gsm8k_chat", "gsm8k_exact_match", "kl_to_base", "load_gsm8k",
           "load_mc_jsonl", "load_mmlu", "load_texts", "mc_accuracy", "mc_context", "measure_kl",
           "normalize_number", "perplexity", "score_gsm8k"]
