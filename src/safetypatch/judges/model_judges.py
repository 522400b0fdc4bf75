"""Model-based judges: Llama-Guard-3 style, the HarmBench classifier, the StrongREJECT rubric and XSTest's 3 classes.

Each judge asks its published prompt (verbatim in `model_prompts.py`, source named beside it), generates greedily
through `modeling.generate` in batches, and parses the output with a strict rule. An output that does not parse
becomes `Verdict(None, "unparseable", parsed=False)`; each judge counts those (`judge.counts`) and logs them, never
mapping them to a class.

Meaning of `Verdict.refused` for the harm classifiers (llamaguard, harmbench_cls): True = the response was judged
*not harmful* (safe / not an instance of the behavior), i.e. the attack failed. For the rubric judges it is the
judge's own refusal call (StrongREJECT item 1; XSTest full *or partial* refusal, see `XSTest3Class`).

Nothing heavy is imported at module level: the package's `__init__` imports this module to register the judges,
and torch / transformers load only when a judge first runs.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Sequence

from ..errors import JudgeError
from ..modeling import Chat
from .base import Judge, Verdict
from .model_prompts import (XSTEST_SYSTEM_PROMPT, format_harmbench, format_strongreject, format_xstest, parse_harmbench,
                            parse_llamaguard, parse_strongreject, parse_xstest)

log = logging.getLogger(__name__)


class RawPromptTokenizer:
    """A tokenizer view whose 'chat template' returns the last message's text as is (the tokenizer's own special
    tokens, e.g. BOS, added): for judges whose published prompt is already in the model's raw format."""

    chat_template = "raw"

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def apply_chat_template(self, messages: Chat, add_generation_prompt: bool = True, tokenize: bool = True,
                            **_: Any) -> Any:
        text = messages[-1]["content"]
        if not tokenize:
            return text
        return list(self._tok(text, add_special_tokens=True)["input_ids"])


class ModelJudge(Judge):
    """A judge that asks a causal LM. `model`: hub id, local directory, .gguf, 'default', or a loaded
    (model, tokenizer) pair. Generation is greedy and batched; `counts` holds judged / unparseable totals."""

    default_model: ClassVar[str | None] = None
    default_max_new_tokens: ClassVar[int] = 16
    raw_prompt: ClassVar[bool] = False  # True: the prompt is fed as raw text, not through the chat template

    def __init__(self, model: str | tuple[Any, Any] | None = None, batch_size: int = 8,
                 max_new_tokens: int | None = None, dtype: str | None = None, device: str | None = None,
                 progress: bool = False) -> None:
        model = model if model is not None else self.default_model
        if model is None:
            raise JudgeError(f"judge '{self.name}' needs model=: a hub id or local directory of an instruction-tuned "
                             "model to ask")
        if isinstance(model, (tuple, list)) and len(model) != 2:
            raise JudgeError(f"judge '{self.name}': model= takes a spec string or a (model, tokenizer) pair")
        self.model_spec = model
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens or self.default_max_new_tokens)
        self.dtype, self.device, self.progress = dtype, device, progress
        self._loaded: tuple[Any, Any] | None = None
        if isinstance(model, (tuple, list)):
            self._loaded = (model[0], model[1])
        self.counts = {"judged": 0, "unparseable": 0}
        self.last_outputs: list[str] = []  # raw judge outputs of the latest batch, for inspection

    # --- to implement -----------------------------------------------------------------------------------------
    def format(self, prompt: str, response: str, context: str | None = None) -> str | Chat:
        raise NotImplementedError

    def parse(self, text: str) -> Verdict:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------------------
    def load(self) -> tuple[Any, Any]:
        """The (model, tokenizer) pair, loaded on first use."""
        if self._loaded is None:
            from ..modeling import load_model

            # chat_template=None: a judge model needs its own template (a clear JudgeError without one)
            self._loaded = load_model(str(self.model_spec), dtype=self.dtype, device=self.device, chat_template=None)
        return self._loaded

    def judge(self, prompt: str, response: str) -> Verdict:
        return self.judge_many([prompt], [response])[0]

    def judge_many(self, prompts: Sequence[str], responses: Sequence[str],
                   contexts: Sequence[str | None] | None = None) -> list[Verdict]:
        """Judge (prompt, response) pairs in batches; unparseable outputs are counted and logged."""
        from ..config import GenerationConfig
        from ..modeling import generate

        if len(prompts) != len(responses):
            raise ValueError(f"judge '{self.name}': {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        ctx = list(contexts) if contexts is not None else [None] * len(prompts)
        inputs = [self.format(p, r, c) for p, r, c in zip(prompts, responses, ctx)]
        model, tok = self.load()
        if self.raw_prompt:
            tok = RawPromptTokenizer(tok)
        elif not getattr(tok, "chat_template", None):
            raise JudgeError(f"judge '{self.name}': the judge model's tokenizer has no chat template")
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, do_sample=False)
        gens = generate(model, tok, inputs, cfg, desc=f"judging ({self.name})", progress=self.progress)
        self.last_outputs = [g.text for g in gens]
        verdicts = [self.parse(t) for t in self.last_outputs]
        bad = sum(not v.parsed for v in verdicts)
        self.counts["judged"] += len(verdicts)
        self.counts["unparseable"] += bad
        if bad:
            log.warning("judge %s: %d of %d outputs unparseable (counted as unparseable, not as a class); first: %r",
                        self.name, bad, len(verdicts), next(t for t, v in zip(self.last_outputs, verdicts)
                                                           if not v.parsed)[:80])
        return verdicts


class LlamaGuard(ModelJudge):
    name = "llamaguard"
    description = "Llama-Guard-3 style: the classifier's chat template on (prompt, response); 'safe' / 'unsafe'"
    default_model = "meta-llama/Llama-Guard-3-8B"
    default_max_new_tokens = 10  # "unsafe\nS1,S10" is a handful of tokens

    def format(self, prompt: str, response: str, context: str | None = None) -> Chat:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    def parse(self, text: str) -> Verdict:
        return parse_llamaguard(text)


class HarmBenchClassifier(ModelJudge):
    name = "harmbench_cls"
    description = "HarmBench Llama-2 classifier prompt (verbatim, raw [INST] text); 'yes' = harmful"
    default_model = "cais/HarmBench-Llama-2-13b-cls"
    default_max_new_tokens = 4  # the official run generates 1 token; greedy, so the first token is the same
    raw_prompt = True

    def format(self, prompt: str, response: str, context: str | None = None) -> str:
        return format_harmbench(prompt, response, context)

    def parse(self, text: str) -> Verdict:
        return parse_harmbench(text)


class StrongREJECTRubric(ModelJudge):
    name = "strongreject"
    description = "StrongREJECT rubric (verbatim); score = (1 - refused) * (convincing + specific - 2) / 8"
    default_max_new_tokens = 512  # the rubric asks for a reasoning line per item (the original allowed 1000)

    def format(self, prompt: str, response: str, context: str | None = None) -> Chat:
        return [{"role": "user", "content": format_strongreject(prompt, response)}]

    def parse(self, text: str) -> Verdict:
        return parse_strongreject(text)


class XSTest3Class(ModelJudge):
    """XSTest's GPT-4 classification prompt asked of any model. `refused` is True for 2_full_refusal *and* for
    3_partial_refusal: a partial refusal still withholds (part of) the answer, which is what an over-refusal or a
    refusal rate counts; the label keeps the three classes apart for the 3-class rates. On a harmful request the
    label is also a whole-answer class (`whole_answer_class`): 3_partial_refusal = refused_then_complied."""

    name = "xstest_3class"
    description = "XSTest 3 classes (full compliance / full refusal / partial refusal) with its GPT-4 prompt"
    default_max_new_tokens = 16  # as in the original call
    whole_answer = "harmful"

    def __init__(self, *args: Any, system_prompt: str | None = XSTEST_SYSTEM_PROMPT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.system_prompt = system_prompt  # None for chat templates without a system role

    def format(self, prompt: str, response: str, context: str | None = None) -> Chat:
        chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return chat + [{"role": "user", "content": format_xstest(prompt, response)}]

    def parse(self, text: str) -> Verdict:
        return parse_xstest(text)


MODEL_JUDGES = ("llamaguard", "harmbench_cls", "strongreject", "xstest_3class")
