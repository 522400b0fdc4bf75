"""Utility metrics: what a safety patch costs on ordinary tasks.

- multiple-choice accuracy by the log-likelihood of each choice's continuation (lm-evaluation-harness style):
  MMLU (`letter` style: the choices are listed, the continuation is " A" / " B" / ...) and ARC-like JSONL
  (`text` style: the continuation is the choice text; also length-normalised accuracy);
- GSM8K exact match: the gold answer follows "####"; the prediction is the last number in the generation;
- perplexity on a text set;
- KL(base || patched) per token, teacher-forced on the base model's own greedy answers to benign prompts.

Base and patched always come from one loaded model: the patch is attached once (safetypatch.patch.load_patch) and
the base model is the same object inside peft's `with model.disable_adapter():`. Forward passes are written here
because transformers has no batched continuation scorer; lm-evaluation-harness has one but is not a dependency. Prompts are scored as raw text (no chat template), as lm-evaluation-harness does by
default; GSM8K and KL use the chat template, since they are about the assistant's answers.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import GenerationConfig
from ..data.chat import prompt_ids
from ..errors import DataError
from ..data.readers import iter_rows
from ..modeling.generation import as_chat, generate
from .refusal import _variant as model_variant  # noqa: F401  (re-exported: base / patched of one loaded model)

LETTERS = "ABCDEFGHIJ"
MAX_BATCH_TOKENS = 4096  # rows x padded width per forward pass (bounds activations)
MAX_LOGIT_TOKENS = 1024  # rows x scored positions per forward pass: bounds the (rows, keep, vocab) float32 logits


# ============================================================================================ data
@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    id: str
    subject: str = ""


def _mmlu_file(path: Path) -> list[MCItem]:
    subject = path.name.removesuffix("_test.csv").removesuffix(".csv")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise DataError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer letter), "
                                f"got {len(row)}")
            ans = row[5].strip().upper()
            if ans not in ("A", "B", "C", "D"):
                raise DataError(f"{path}:{line}: field 'answer' (column 6) must be A, B, C or D, got {row[5]!r}")
            out.append(MCItem(row[0].strip(), [c.strip() for c in row[1:5]], "ABCD".index(ans),
                              f"{subject}/{line}", subject))
    return out


def load_mmlu(path: str | Path, subjects: Sequence[str] | None = None, limit: int | None = None) -> list[MCItem]:
    """MMLU from the original headerless CSVs (a directory of `<subject>_test.csv`, or one file).

    With a limit, questions are taken round-robin over the subjects (in file order within each), so a small
    sample covers many subjects instead of the first one alphabetically.
    """
    p = Path(path)
    files = sorted(p.glob("*.csv")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise DataError(f"{p}: no MMLU CSV files (expected <subject>_test.csv with question,A,B,C,D,answer)")
    if subjects:
        wanted = set(subjects)
        files = [f for f in files if f.name.removesuffix("_test.csv").removesuffix(".csv") in wanted]
        if not files:
            raise DataError(f"{p}: none of the subjects {sorted(wanted)} found")
    per_subject = [_mmlu_file(f) for f in files]
    if not any(per_subject):
        raise DataError(f"{p}: no questions (empty file?)")
    out: list[MCItem] = []
    for i in range(max(len(s) for s in per_subject)):
        out.extend(s[i] for s in per_subject if i < len(s))
    return out[:limit] if limit else out


def load_mc_jsonl(path: str | Path, limit: int | None = None) -> list[MCItem]:
    """Generic multiple choice: rows {question, choices, answer}; `choices` a list of strings or ARC's
    {text: [...], label: [...]}; `answer` (or ARC's `answerKey`) an index, a label / letter, or the choice text."""
    name, rows = iter_rows(path)
    out: list[MCItem] = []
    for line, row in rows:
        where = f"{name}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields question, choices, answer")
        q = row.get("question")
        if isinstance(q, dict):  # ARC hub layout: question: {stem, choices}
            row = {**row, "choices": q.get("choices"), "question": q.get("stem")}
            q = row["question"]
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: field 'question' is missing or empty")
        choices = row.get("choices")
        labels: list[str] = []
        if isinstance(choices, dict):
            labels = [str(x) for x in choices.get("label", [])]
            choices = choices.get("text")
        elif isinstance(choices, list) and choices and isinstance(choices[0], dict):
            labels = [str(c.get("label", "")) for c in choices]
            choices = [c.get("text") for c in choices]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of at least 2 strings")
        labels = labels or list(LETTERS[: len(choices)])
        ans = row.get("answer", row.get("answerKey"))
        idx: int | None = None
        if isinstance(ans, bool):
            idx = None
        elif isinstance(ans, int):
            idx = ans
        elif isinstance(ans, str):
            a = ans.strip()
            if a in labels:
                idx = labels.index(a)
            elif a in choices:
                idx = choices.index(a)
            elif a.isdigit():
                idx = int(a)
        if idx is None or not 0 <= idx < len(choices):
            raise DataError(f"{where}: field 'answer' must be a choice index, label or text, got {ans!r}")
        out.append(MCItem(q.strip(), [c.strip() for c in choices], idx, str(row.get("id", line)),
                          str(row.get("subject", ""))))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{name}: no questions")
    return out


@dataclass
class GSMItem:
    question: str
    gold: str  # normalised number after '####'
    id: str


def gold_answer(answer_text: str) -> str:
    """The number after GSM8K's '####' marker, normalised ('1,000' -> '1000')."""
    if "####" not in answer_text:
        raise ValueError("no '####' marker")
    norm = normalize_number(answer_text.split("####")[-1])
    if norm is None:
        raise ValueError(f"no number after '####': {answer_text.split('####')[-1]!r}")
    return norm


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18' -> '18', '-3.0' -> '-3'; None when there is no number."""
    m = _NUMBER.search(text.strip())
    if not m:
        return None
    s = m.group(0).replace(",", "").replace("$", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v.is_integer() else repr(v)


_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*", re.IGNORECASE)


def extract_answer(generation: str) -> str | None:
    """The predicted number of a GSM8K answer, normalised; None if there is none.

    In order: the first number after the last '####' (the format the prompt asks for, lm-evaluation-harness's
    'strict match'); else the first number after the last 'answer is' / 'answer:'; else the last number in the
    text ('flexible extract').
    """
    if "####" in generation:
        got = normalize_number(generation.rsplit("####", 1)[1])
        if got is not None:
            return got
    marks = list(_ANSWER_IS.finditer(generation))
    if marks:
        got = normalize_number(generation[marks[-1].end():])
        if got is not None:
            return got
    found = _NUMBER.findall(generation)
    return normalize_number(found[-1]) if found else None


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[GSMItem]:
    """GSM8K JSONL rows {question, answer} with the gold answer after '####'."""
    name, rows = iter_rows(path)
    out = []
    for line, row in rows:
        where = f"{name}:{line}"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{where}: field 'question' is missing")
        if not isinstance(row.get("answer"), str):
            raise DataError(f"{where}: field 'answer' is missing (GSM8K format: solution ending in '#### N')")
        try:
            gold = gold_answer(row["answer"])
        except ValueError as e:
            raise DataError(f"{where}: field 'answer': {e}") from None
        out.append(GSMItem(row["question"].strip(), gold, str(row.get("id", line))))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{name}: no questions")
    return out


def load_texts(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Texts for perplexity: a .txt file (one text per non-empty line) or JSONL / JSON / CSV rows with `text_field`."""
    p = Path(path)
    if p.suffix == ".txt":
        if not p.exists():
            raise DataError(f"{p}: no such file")
        texts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        name, rows = iter_rows(p)
        texts = []
        for line, row in rows:
            v = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{name}:{line}: field '{text_field}' is missing or empty")
            texts.append(v.strip())
            if limit and len(texts) >= limit:
                break
    if not texts:
        raise DataError(f"{p}: no texts")
    return texts[:limit] if limit else texts


# ============================================================================================ scoring
def _forward_logits(model: Any, seqs: list[list[int]], keep: int) -> Any:
    """Log-probabilities (float32) at the last `keep` positions of each left-padded sequence: (rows, keep, vocab).

    Position ids follow the attention mask, so a left-padded row gets the same logits as the row alone.
    """
    import torch

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        attn[r, width - len(s):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device))
    with torch.no_grad():
        try:
            logits = model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # architectures without `logits_to_keep`
            logits = model(**kwargs).logits
    return torch.log_softmax(logits[:, -keep:].float(), dim=-1)


def _batches(order: list[int], lengths: list[int], keeps: list[int], max_rows: int, max_tokens: int,
             max_logit_tokens: int = MAX_LOGIT_TOKENS) -> list[list[int]]:
    """Group indices (sorted longest first) so rows x width <= max_tokens and rows x keep <= max_logit_tokens
    (a single row always fits)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        rows = len(cur) + 1
        width = max([lengths[j] for j in cur] + [lengths[i]])
        keep = max([keeps[j] for j in cur] + [keeps[i]])
        if cur and (rows > max_rows or rows * width > max_tokens or rows * keep > max_logit_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _target_logprobs(lp: Any, row: int, keep: int, targets: Sequence[int]) -> Any:
    """log p(targets[t]) at the last len(targets) of the `keep` scored positions of `row`: a 1-D tensor."""
    import torch

    n = len(targets)
    idx = torch.tensor(list(targets), dtype=torch.long, device=lp.device).unsqueeze(-1)
    return lp[row, keep - n:].gather(-1, idx).squeeze(-1)


def score_continuations(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                        max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
                        desc: str = "scoring") -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of tokens) of each continuation given its context.

    Tokenized as lm-evaluation-harness does: the whole text is encoded and split at the context's length. The
    model reads context + continuation minus its last token; requests with the same input (e.g. the letters
    " A".." D" after one MMLU question) share one forward pass.
    """
    from tqdm.auto import tqdm

    reqs: list[tuple[tuple[int, ...], list[int]]] = []
    for ctx, cont in pairs:
        ctx_ids = list(tok(ctx)["input_ids"])
        whole = list(tok(ctx + cont)["input_ids"])
        if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
            cont_ids = whole[len(ctx_ids):]
        else:
            cont_ids = list(tok(cont, add_special_tokens=False)["input_ids"])
            whole = ctx_ids + cont_ids
        if not cont_ids:
            raise ValueError(f"empty continuation {cont!r}")
        if not ctx_ids:
            raise ValueError(f"empty context for continuation {cont!r}")
        reqs.append((tuple(whole[:-1]), cont_ids))
    need: dict[tuple[int, ...], int] = {}  # input -> most positions any of its continuations needs
    by_input: dict[tuple[int, ...], list[int]] = {}
    for k, (inp, cont) in enumerate(reqs):
        need[inp] = max(need.get(inp, 0), len(cont))
        by_input.setdefault(inp, []).append(k)
    inputs = list(need)
    lengths = [len(x) for x in inputs]
    keeps = [need[x] for x in inputs]
    order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
    results: list[tuple[float, int] | None] = [None] * len(reqs)
    bar = tqdm(total=len(inputs), desc=desc, disable=not progress or len(inputs) < 2, leave=False)
    try:
        for batch in _batches(order, lengths, keeps, batch_size, max_batch_tokens):
            keep = max(keeps[i] for i in batch)
            lp = _forward_logits(model, [list(inputs[i]) for i in batch], keep)
            for row, i in enumerate(batch):
                for k in by_input[inputs[i]]:
                    cont = reqs[k][1]
                    results[k] = (float(_target_logprobs(lp, row, keep, cont).sum()), len(cont))
            bar.update(len(batch))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


# ============================================================================================ MC
def mc_context(item: MCItem, style: str) -> tuple[str, list[str]]:
    """The context and the continuation of each choice, in lm-evaluation-harness's MMLU / ARC prompt formats."""
    if style == "letter":
        subject = item.subject.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
        body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        return f"{head}{item.question}\n{body}\nAnswer:", [f" {LETTERS[i]}" for i in range(len(item.choices))]
    if style == "text":
        return f"Question: {item.question}\nAnswer:", [f" {c}" for c in item.choices]
    raise ValueError(f"unknown multiple-choice style '{style}' (letter | text)")


@dataclass
class MCResult:
    accuracy: float
    accuracy_norm: float | None  # choice log-likelihood / its length in bytes ('text' style only)
    n: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def mc_accuracy(model: Any, tok: Any, items: Sequence[MCItem], style: str = "letter", batch_size: int = 16,
                progress: bool = True, desc: str = "multiple choice") -> MCResult:
    """Accuracy: the choice whose continuation is most likely; ties go to the first choice."""
    pairs: list[tuple[str, str]] = []
    spans = []
    for it in items:
        ctx, conts = mc_context(it, style)
        spans.append((len(pairs), len(conts)))
        pairs.extend((ctx, c) for c in conts)
    scores = score_continuations(model, tok, pairs, batch_size=batch_size, progress=progress, desc=desc)
    rows, correct, correct_norm = [], 0, 0
    for it, (start, k) in zip(items, spans):
        lls = [scores[start + j][0] for j in range(k)]
        conts = [pairs[start + j][1] for j in range(k)]
        pred = max(range(k), key=lambda j: lls[j])
        normed = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, conts)]
        pred_norm = max(range(k), key=lambda j: normed[j])
        correct += pred == it.answer
        correct_norm += pred_norm == it.answer
        rows.append({"id": it.id, "subject": it.subject, "gold": it.answer, "pred": pred,
                     "correct": pred == it.answer, "loglik": [round(x, 4) for x in lls]})
    n = len(items)
    return MCResult(correct / n if n else float("nan"), (correct_norm / n if n else None) if style == "text" else None,
                    n, rows)


# ============================================================================================ GSM8K
GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer as a number after '####'."


def gsm8k_chat(item: GSMItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{item.question}\n\n{GSM8K_INSTRUCTION}"}]


@dataclass
class GSMResult:
    exact_match: float
    n: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def score_gsm8k(items: Sequence[GSMItem], responses: Sequence[str]) -> GSMResult:
    """Exact match of the last number in each response against the gold answer."""
    rows = []
    for it, resp in zip(items, responses):
        pred = extract_answer(resp)
        rows.append({"id": it.id, "question": it.question, "response": resp, "pred": pred, "gold": it.gold,
                     "correct": pred is not None and pred == it.gold})
    n = len(rows)
    return GSMResult(sum(r["correct"] for r in rows) / n if n else float("nan"), n, rows)


def gsm8k_exact_match(model: Any, tok: Any, items: Sequence[GSMItem], gen: GenerationConfig | None = None,
                      progress: bool = True, generate_fn: Any = None) -> GSMResult:
    """Greedy answers to each question, scored by `score_gsm8k`."""
    gen = gen or GenerationConfig(max_new_tokens=256)
    outs = (generate_fn or generate)(model, tok, [gsm8k_chat(it) for it in items], gen, desc="gsm8k",
                                     progress=progress)
    return score_gsm8k(items, [g.text for g in outs])


# ============================================================================================ perplexity
@dataclass
class PPLResult:
    perplexity: float
    nll_per_token: float
    n_tokens: int
    n_texts: int
    per_text: list[float] = field(default_factory=list)  # mean NLL per token of each text


def perplexity(model: Any, tok: Any, texts: Sequence[str], max_length: int = 512, batch_size: int = 8,
               max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True) -> PPLResult:
    """exp(mean negative log-likelihood per predicted token), pooled over all texts (truncated to max_length)."""
    from tqdm.auto import tqdm

    seqs = [list(tok(t)["input_ids"])[:max_length] for t in texts]
    keep_idx = [i for i, s in enumerate(seqs) if len(s) >= 2]
    lengths = [max(0, len(s) - 1) for s in seqs]
    order = sorted(keep_idx, key=lambda i: -lengths[i])
    nll: list[float] = [0.0] * len(seqs)
    n_tok: list[int] = [0] * len(seqs)
    bar = tqdm(total=len(order), desc="perplexity", disable=not progress or len(order) < 2, leave=False)
    try:
        for batch in _batches(order, lengths, lengths, batch_size, max_batch_tokens):
            inputs = [seqs[i][:-1] for i in batch]
            keep = max(len(x) for x in inputs)
            lp = _forward_logits(model, inputs, keep)
            for row, i in enumerate(batch):
                targets = seqs[i][1:]
                nll[i] = -float(_target_logprobs(lp, row, keep, targets).sum())
                n_tok[i] = len(targets)
            bar.update(len(batch))
    finally:
        bar.close()
    total_tok = sum(n_tok)
    if total_tok == 0:
        raise DataError("perplexity: no text has two or more tokens")
    mean = sum(nll) / total_tok
    return PPLResult(math.exp(mean), mean, total_tok, len(keep_idx),
                     [nll[i] / n_tok[i] for i in keep_idx])


# ============================================================================================ KL to base
@dataclass
class KLResult:
    kl_per_token: float  # pooled mean over all answer tokens
    kl_per_prompt: float  # mean over prompts of each prompt's mean per-token KL
    n_tokens: int
    n_prompts: int
    n_empty: int  # prompts whose base answer was empty (nothing to score)
    rows: list[dict[str, Any]] = field(default_factory=list)


def kl_to_base(model: Any, tok: Any, prompts: Sequence[Any], gen: GenerationConfig | None = None,
               batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS, progress: bool = True,
               base_answers: Sequence[Any] | None = None) -> KLResult:
    """KL(base || patched) per token on the base model's own greedy answers (teacher-forced).

    `model` is one PEFT model: base = inside `model.disable_adapter()`, patched = as it is. The answer tokens
    include the end-of-turn token when the base answer finished. `base_answers` (Generation objects) skips the
    base generation when already done.
    """
    import dataclasses

    import torch
    from tqdm.auto import tqdm

    from ..errors import ConfigError

    if not hasattr(model, "disable_adapter"):
        raise ConfigError("KL to base needs a patched model (a PEFT model with an adapter); give --patch")
    chats = [as_chat(p.chat() if hasattr(p, "chat") else p) for p in prompts]
    if base_answers is None:
        gen = dataclasses.replace(gen or GenerationConfig(), do_sample=False)
        with model.disable_adapter():
            base_answers = generate(model, tok, chats, gen, desc="KL: base answers", progress=progress)
    eos = tok.eos_token_id
    items = []  # (prompt index, input ids, answer ids)
    for i, (chat, g) in enumerate(zip(chats, base_answers)):
        ans = list(g.token_ids) + ([eos] if g.finished and eos is not None else [])
        if ans:
            full = prompt_ids(tok, chat) + ans
            items.append((i, full[:-1], ans))
    lengths = [len(x[1]) for x in items]
    keeps = [len(x[2]) for x in items]
    order = sorted(range(len(items)), key=lambda k: -lengths[k])
    per_prompt: dict[int, tuple[float, int]] = {}
    bar = tqdm(total=len(items), desc="KL to base", disable=not progress or len(items) < 2, leave=False)
    try:
        for batch in _batches(order, lengths, keeps, batch_size, max_batch_tokens):
            keep = max(keeps[k] for k in batch)
            seqs = [items[k][1] for k in batch]
            with model.disable_adapter():
                lp_base = _forward_logits(model, seqs, keep)
            lp_patch = _forward_logits(model, seqs, keep)
            # KL(base || patched) at each position; xlogy-style: a token with p_base = 0 contributes 0, never NaN
            p_base = lp_base.exp()
            kl = torch.where(p_base > 0, p_base * (lp_base - lp_patch), torch.zeros_like(p_base)).sum(-1)
            del p_base, lp_base, lp_patch
            for row, k in enumerate(batch):
                n = len(items[k][2])
                per_prompt[items[k][0]] = (float(kl[row, keep - n:].sum()), n)
            bar.update(len(batch))
    finally:
        bar.close()
    total = sum(v for v, _ in per_prompt.values())
    n_tok = sum(n for _, n in per_prompt.values())
    rows = [{"index": i, "kl_sum": per_prompt[i][0], "n_tokens": per_prompt[i][1],
             "kl_per_token": per_prompt[i][0] / per_prompt[i][1],
             "base_answer": base_answers[i].text} for i in sorted(per_prompt)]
    return KLResult(total / n_tok if n_tok else float("nan"),
                    sum(r["kl_per_token"] for r in rows) / len(rows) if rows else float("nan"),
                    n_tok, len(rows), len(chats) - len(items), rows)
