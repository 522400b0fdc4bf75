"""Refusal and harm judges: one registry (`base.py`), filled here from the judge modules (the peft
`register_peft_method` habit), so every judge is available wherever `safetypatch.judges` is imported.

To add a judge: write a `Judge` subclass with a `name` in any module of this folder (a keyword rule in
`keyword.py`, a model asked with a published prompt in `model_judges.py`, or a new file): every module here is
imported below and every named `Judge` subclass it defines is registered, in module and definition order. Nothing
heavy is imported here.
"""

import importlib
import pkgutil

from .base import (JUDGES, UNPARSEABLE, WHOLE_ANSWER_CLASSES, Judge, Verdict, get_judge, register_judge, unparseable,
                   verdict_summary, whole_answer_class, whole_answer_judge)
from .keyword import (DEFAULT_JUDGES, GCG_REFUSAL_PREFIXES, XSTEST_REFUSAL_PREFIXES, GCGPrefixMatch,
                      KeywordThreeClass, RefusalWhole, XSTestStringMatch, keyword_refusal, keyword_refusal_decided,
                      three_class, whole_answer)
from .model_judges import (MODEL_JUDGES, HarmBenchClassifier, LlamaGuard, ModelJudge, StrongREJECTRubric,
                           XSTest3Class)



def register_package_judges() -> None:
    """Import every module of this package and register each `Judge` subclass with a name that it defines."""
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Judge) and obj.name
                    and obj.__module__ == module.__name__ and obj.name not in JUDGES):
                register_judge(obj)


register_package_judges()

__all__ = ["DEFAULT_JUDGES", "GCG_REFUSAL_PREFIXES", "JUDGES", "MODEL_JUDGES", "UNPARSEABLE",
           "WHOLE_ANSWER_CLASSES", "XSTEST_REFUSAL_PREFIXES", "GCGPrefixMatch", "HarmBenchClassifier", "Judge",
           "KeywordThreeClass", "LlamaGuard", "ModelJudge", "RefusalWhole", "StrongREJECTRubric", "Verdict",
           "XSTest3Class", "XSTestStringMatch", "get_judge", "keyword_refusal", "keyword_refusal_decided",
           "register_judge", "register_package_judges", "three_class", "unparseable", "verdict_summary",
           "whole_answer", "whole_answer_class", "whole_answer_judge"]
