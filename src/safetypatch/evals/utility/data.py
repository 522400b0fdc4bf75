"""Utility data loaders: MMLU's headerless CSVs, multiple-choice JSONL (ARC layouts too), GSM8K JSONL, and texts
for perplexity. Errors name the file, the line and the field."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ...data.readers import iter_objects, iter_rows
from ...data.text import open_text, read_text
from ...errors import DataError

LETTERS = "ABCDEFGHIJ"
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    id: str
    subject: str = ""


def _csv_lines(reader: Any, path: Path) -> Iterator[list[str]]:
    """The rows of a csv.reader; a csv.Error names the file and the line."""
    try:
        yield from reader
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({e}); an unclosed quote makes the rest of "
                        "the file one field: close it") from None


def _mmlu_file(path: Path) -> list[MCItem]:
    subject = path.name.removesuffix("_test.csv").removesuffix(".csv")
    out = []
    with open_text(path, newline="") as f:
        reader = csv.reader(f)
        for line, row in enumerate(_csv_lines(reader, path), 1):  # the row number (the item's id), as before
            if len(row) != 6:
                raise DataError(f"{path}:{reader.line_num}: expected 6 columns (question, A, B, C, D, answer letter), "
                                f"got {len(row)}")
            ans = row[5].strip().upper()
            if ans not in ("A", "B", "C", "D"):
                raise DataError(f"{path}:{reader.line_num}: field 'answer' (column 6) must be A, B, C or D, got {row[5]!r}")
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
    name, rows = iter_objects(path, "fields question, choices, answer")
    out: list[MCItem] = []
    for line, row in rows:
        where = f"{name}:{line}"
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



def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18' -> '18', '-3.0' -> '-3'; None when there is no number."""
    m = NUMBER.search(text.strip())
    if not m:
        return None
    s = m.group(0).replace(",", "").replace("$", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v.is_integer() else repr(v)


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
        texts = [ln.strip() for ln in read_text(p).splitlines() if ln.strip()]
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
