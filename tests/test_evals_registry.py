"""The evaluation registries are public and open: a new suite entry type is one class, a new benchmark one
decorated loader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from safetypatch.data.readers import Record
from safetypatch.errors import SuiteError
from safetypatch.evals.benchmarks import BENCHMARKS, BenchmarkSpec, load_benchmark, register_benchmark
from safetypatch.evals.suite import (ENTRY_TYPES, Measured, Prepared, RunContext, SuiteEntry, SuiteRunConfig,
                                     load_suite, register_entry_type)


@pytest.fixture()
def answer_length_type():
    """A utility metric in one class: the mean length in characters of each variant's answers to the file's lines."""

    @register_entry_type
    @dataclass
    class AnswerLength(SuiteEntry):
        type = "answer_length"
        metrics = ("mean_chars",)

        def load_items(self, local: Path) -> list[Any]:
            return [ln for ln in local.read_text().splitlines() if ln.strip()]

        def requests(self, p: Prepared, variants: list[str], gen: Any) -> list[tuple[str, int, list[Any]]]:
            return [(v, gen.max_new_tokens, [[{"role": "user", "content": t}] for t in p.items]) for v in variants]

        def measure(self, p: Prepared, run: RunContext) -> Measured:
            out = Measured()
            for v in run.variants:
                lengths = [len(run.answer(v, run.gen.max_new_tokens, [{"role": "user", "content": t}]).text)
                           for t in p.items]
                out.metric(v, self.name, "mean_chars", sum(lengths) / len(lengths), len(lengths))
            return out

    yield AnswerLength
    del ENTRY_TYPES["answer_length"]


def test_a_new_entry_type_is_one_class(answer_length_type, tiny_model_dir, tmp_path):
    from safetypatch.jobs.suite import run_suite

    (tmp_path / "lines.txt").write_text("Hi\nWrite a poem about the sea.\n")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"generation: {{max_new_tokens: 3}}\nentries:\n"
                     f"  - {{type: answer_length, path: {tmp_path / 'lines.txt'}}}\n")
    assert load_suite(str(suite)).entries[0].name == "answer_length:lines.txt"
    summary = run_suite(SuiteRunConfig(suite=str(suite), model=str(tiny_model_dir), record=False), tmp_path / "out")
    (m,) = summary["metrics"]
    assert (m["benchmark"], m["metric"], m["n"]) == ("answer_length:lines.txt", "mean_chars", 2)
    assert summary["entries"]["answer_length:lines.txt"]["type"] == "answer_length"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"] == summary["metrics"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - {type: answer_length, path: x, colour: red}\n")
    with pytest.raises(SuiteError, match=r"unknown field\(s\) \['colour'\] for a answer_length entry"):
        load_suite(str(bad))


def test_register_benchmark_is_public():
    spec = BenchmarkSpec("tiny_test_set", "benign", "two prompts for this test", None, None)

    @register_benchmark(spec)
    def _load(path: Path | None) -> list[Record]:
        return [Record(prompt=p, meta={"benchmark": spec.name, "id": str(i), "category": "", "label": "benign"})
                for i, p in enumerate(["Hi", "Write a poem"])]

    try:
        assert BENCHMARKS["tiny_test_set"] is spec
        assert [r.prompt for r in load_benchmark("tiny_test_set", limit=1)] == ["Hi"]
    finally:
        from safetypatch.evals.benchmarks import BENCHMARK_LOADERS

        del BENCHMARKS["tiny_test_set"], BENCHMARK_LOADERS["tiny_test_set"]
