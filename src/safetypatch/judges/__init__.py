"""Refusal and harm judges: one registry, filled by importing the judge modules here (the peft
`register_peft_method` habit), so every judge is available wherever `safetypatch.judges` is imported."""

from .keyword import (DEFAULT_JUDGES, GCG_REFUSAL_PREFIXES, JUDGES, XSTEST_REFUSAL_PREFIXES, Judge, Verdict,
                      get_judge, keyword_refusal, keyword_refusal_decided, register_judge, verdict_summary)
from . import model_judges  # noqa: F401  (registers the model-based judges; imports nothing heavy)

__all__ = ["DEFAULT_JUDGES", "GCG_REFUSAL_PREFIXES", "JUDGES", "XSTEST_REFUSAL_PREFIXES", "Judge", "Verdict",
           "get_judge", "keyword_refusal", "keyword_refusal_decided", "register_judge", "verdict_summary"]
