"""The certificate loses no entry (issue 16): patch.json is updated read-modify-write under a lock (`.patch.json.lock`
beside it) and written atomically, so evaluations recorded by several processes at once, and a calibration, are all
kept; the weights' sha256 is untouched."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from safetypatch.errors import PatchError
from safetypatch.patches import patch_info, record_calibration, record_evaluation, update_meta, verify_files

FORK = multiprocessing.get_context("fork")
CALIBRATION = {"date": "2026-01-01T00:00:00+00:00", "chosen_factor": 1.0, "within_budget": True, "budget": 0.05,
               "base_benign_refusal": 0.0, "curve": [{"factor": 1.0, "harmful_refusal": 0.5, "benign_refusal": 0.0}]}


def _record_many(patch, who: int, n: int, start) -> None:
    start.wait(30)
    for i in range(n):
        record_evaluation(patch, {"suite": f"writer-{who}", "n": i, "refusal": {"patched": {"kw": 0.5}}})


def test_four_processes_recording_25_evaluations_each_keep_all_100(tiny_patch):
    sha = verify_files(tiny_patch)["weights"]["sha256"]
    start = FORK.Event()
    procs = [FORK.Process(target=_record_many, args=(tiny_patch, w, 25, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    evals = patch_info(tiny_patch)["evaluations"]
    assert len(evals) == 100
    want = sorted((f"writer-{w}", i) for w in range(4) for i in range(25))
    assert sorted((e["suite"], e["n"]) for e in evals) == want
    assert verify_files(tiny_patch)["weights"]["sha256"] == sha
    assert sorted(p.name for p in tiny_patch.iterdir() if p.name.startswith(".")) == []  # no lock or temp left


def test_calibration_and_evaluations_recorded_together_are_both_kept(tiny_patch):
    start = FORK.Event()
    writer = FORK.Process(target=_record_many, args=(tiny_patch, 0, 20, start))
    writer.start()
    start.set()
    for _ in range(10):
        record_calibration(tiny_patch, CALIBRATION)
    writer.join(60)
    meta = json.loads((tiny_patch / "patch.json").read_text())
    assert len(meta["evaluations"]) == 20 and meta["calibration"] == CALIBRATION


def test_a_killed_recorders_temp_file_is_removed_by_the_next_record(tiny_patch):
    (tiny_patch / ".patch.json.x1y2z3w4").write_text('{"half": ')
    (tiny_patch / ".patch.json.lock").write_text("pid 999999999\n")  # its lock file, left behind
    record_evaluation(tiny_patch, {"suite": "s", "n": 1, "refusal": {}})
    assert sorted(p.name for p in tiny_patch.iterdir() if p.name.startswith(".")) == []
    assert len(patch_info(tiny_patch)["evaluations"]) == 1


def test_an_update_is_checked_before_it_is_written(tiny_patch):
    before = (tiny_patch / "patch.json").read_bytes()
    with pytest.raises(PatchError, match=r"evaluations\[0\]\.refusal\.patched\.kw"):
        record_evaluation(tiny_patch, {"suite": "s", "refusal": {"patched": {"kw": float("nan")}}})
    with pytest.raises(PatchError, match="calibration"):
        record_calibration(tiny_patch, {"chosen_factor": 1.0})  # not a calibration record
    assert (tiny_patch / "patch.json").read_bytes() == before
    assert update_meta(tiny_patch, lambda meta: len(meta)) == len(json.loads(before))


def test_a_damaged_patch_json_is_not_rewritten(tiny_patch):
    (tiny_patch / "patch.json").write_text('["not", "an", "object"]')
    with pytest.raises(PatchError, match="must hold a JSON object"):
        record_evaluation(tiny_patch, {"suite": "s"})
    assert (tiny_patch / "patch.json").read_text() == '["not", "an", "object"]'
