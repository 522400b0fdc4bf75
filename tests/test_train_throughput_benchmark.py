"""benchmarks/train_throughput.py end to end on a tiny model: both baselines train the same steps from the same
adapter, so their losses agree, and the report ends with the line other tools read."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.mark.parametrize("baseline", ["shipped", "tuned"])
def test_benchmark_runs_both_trainers_on_the_same_steps(tiny_model_dir, baseline):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--examples", "24", "--steps", "4",
         "--chunk", "2", "--baseline", baseline],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup \d+\.\d\dx over TRL\+PEFT \(loss \d+\.\d{4} vs \d+\.\d{4}\)", lines[-1]), lines[-1]
    assert any(line.startswith(f"baseline {baseline}: ") for line in lines)
    ours, theirs = (json.loads(x) for x in re.search(r"first steps ours (\[.*?\]) vs TRL (\[.*?\])",
                                                       out.stdout).groups())
    # the same batches from the same initial adapter: the first step's loss is the same computation on both sides
    assert abs(ours[0] - theirs[0]) <= 0.02 * abs(theirs[0]), (ours, theirs)
    assert "equal loss within 2%: yes" in out.stdout
    assert re.search(r"ceiling: .* = \d+\.\d\dx this TRL run", out.stdout)
