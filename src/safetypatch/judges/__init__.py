"""Refusal and harm judges: one registry (`base.py`), filled here from the judge modules (the peft
`register_peft_method` habit), so every judge is available wherever `safetypatch.judges` is imported.

To add a judge: write a `Judge` subclass with a `name` (a keyword rule in `keyword.py`, a model asked with a
published prompt in `model_judges.py`) and add it to `_BUILTIN` below. Nothing heavy is imported here.
"""

from .base import JUDGES, UNPARSEABLE, Judge, Verdict, get_judge, register_judge, unparseable, verdict_summary
from .keyword import (DEFAULT_JUDGES, GCG_REFUSAL_PREFIXES, XSTEST_REFUSAL_PREFIXES, GCGPrefixMatch,
                      KeywordThreeClass, XSTestStringMatch, keyword_refusal, keyword_refusal_decided, three_class)
from .model_judges import (MODEL_JUDGES, HarmBenchClassifier, LlamaGuard, ModelJudge, StrongREJECTRubric,
                           XSTest3Class)

_BUILTIN = (XSTestStringMatch, GCGPrefixMatch, KeywordThreeClass,
            LlamaGuard, HarmBenchClassifier, StrongREJECTRubric, XSTest3Class)
for _judge in _BUILTIN:
    register_judge(_judge)

__all__ = ["DEFAULT_JUDGES", "GCG_REFUSAL_PREFIXES", "JUDGES", "MODEL_JUDGES", "UNPARSEABLE",
           "XSTEST_REFUSAL_PREFIXES", "GCGPrefixMatch", "HarmBenchClassifier", "Judge", "KeywordThreeClass",
           "LlamaGuard", "ModelJudge", "StrongREJECTRubric", "Verdict", "XSTest3Class", "XSTestStringMatch",
           "get_judge", "keyword_refusal", "keyword_refusal_decided", "register_judge", "three_class", "unparseable",
           "verdict_summary"]
