"""The trainer's CPU allocator setting: freed blocks are reused instead of being page-faulted in again."""

import platform
import subprocess
import sys

import pytest

from safetypatch.training.malloc import tune_malloc

_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "tune":
    from safetypatch.training.malloc import tune_malloc
    print(tune_malloc(), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # warm up: glibc reuses the freed block only after a few rounds
    torch.empty(16 << 20).fill_(1.0)  # 64 MB, every page touched, then freed
before = faults()
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_instead_of_page_faulted_again():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    default, tuned = run("default"), run("tune")
    assert default > 10 * 16000 * 0.5  # 64 MB = 16k pages of 4 KB, faulted in again on each of the 10 rounds
    assert tuned < default / 10


def test_tune_malloc_is_applied_once_and_says_what_it_did():
    first = tune_malloc()
    assert tune_malloc() == first and first
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first.startswith("glibc: blocks up to 1 GB")

