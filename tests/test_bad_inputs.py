"""The bad-input battery (benchmarks/bad_inputs.py) as a test: every bad input gives a clear error naming it, every
legitimate odd input a correct result; never a traceback, a silently wrong result or a lost artifact.

Each case of benchmarks/bad_inputs_cases.py is one test, run in-process on the tiny model through
`safetypatch.cli.main` in a forked child (races and crashes too), in its own directory: about a minute for all of
them on 2 cores. Cases that are not fixed yet are xfail with the reason (`XFAIL`, strict: a fixed case fails until
it is taken off the list); `python benchmarks/bad_inputs.py --failing` prints the current list.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bad_inputs  # noqa: E402
from bad_inputs_cases import all_cases  # noqa: E402

# not fixed yet (outcome when last measured): each is a bug to fix, not a test to weaken
XFAIL: dict[str, str] = {}


def params() -> list:
    out = []
    for case in all_cases():
        marks = [pytest.mark.xfail(reason=XFAIL[case.id], strict=True)] if case.id in XFAIL else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """The tiny model, its data, a trained patch, a second patch, the merged model and the finished run."""
    import torch

    root = tmp_path_factory.mktemp("bad-inputs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children (races, crashes) must not inherit a thread pool
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYPATCH_HOME", str(root / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield bad_inputs.build_context(root)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", params())
def test_bad_input(battery, case):
    result = bad_inputs.run_case(case, battery)
    assert result.outcome in bad_inputs.GOOD, (
        f"{case.note}: {result.outcome}: {result.message} [{result.detail}]\n"
        f"  safetypatch {' '.join(battery.fmt(a) for a in case.argv)}")


def test_the_battery_covers_every_command_and_kind():
    cases = all_cases()
    commands = {c.command if c.command.startswith("patch") else c.command.split()[0] for c in cases}
    for needed in ("train", "demo", "eval", "calibrate", "redteam", "analyze", "chat", "runs", "compare",
                   "patch info", "patch stack", "patch scale", "patch merge", "patch unmerge", "patch export",
                   "patch project"):
        assert needed in commands, needed
    assert {c.kind for c in cases} >= {"numbers", "files", "patch", "names", "outputs", "race", "crash", "resume",
                                       "text", "flags"}
    assert len(cases) >= 150
