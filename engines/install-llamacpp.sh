#!/usr/bin/env bash
# Install llama.cpp's Python binding (llama-cpp-python) into its own small venv for the marked engine test
# (tests/engines/test_llamacpp_engine.py) and engines/llamacpp_generate.py.
#
#   engines/install-llamacpp.sh VENV_DIR      (the Makefile calls it with .venv-llamacpp)
#
# What it does, and why (measured in issue 20):
#  - llama-cpp-python has no wheel on PyPI for Linux x86-64; its sdist compiles llama.cpp (10-20 min on 2 cores,
#    C/C++ compiler needed; scikit-build-core fetches cmake / ninja from PyPI where the system has none).
#    The wheel is built ONCE into a wheel cache, ${SAFETYPATCH_WHEEL_CACHE:-~/.cache/safetypatch/wheels}, in a
#    folder per CPU: the default build is GGML_NATIVE (-march=native), so a wheel built on one CPU may stop with
#    an illegal instruction on another; the folder name carries a hash of the CPU's feature flags.
#  - the venv holds only the wheel and its own dependencies (numpy, jinja2, diskcache, typing-extensions): no
#    torch and no safetypatch (the driver is standalone; the test's transformers side runs in the project venv).
# VENV_DIR/.stamp-engine is touched only after `import llama_cpp` works, so a half install is never taken as
# done. Running it again is safe: finished -> nothing to do; half done -> it continues (the wheel is reused).
set -euo pipefail

LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${SAFETYPATCH_WHEEL_CACHE:-$HOME/.cache/safetypatch/wheels}"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/venv.sh"
engine_venv llamacpp "$@"

# the CPU the native build is for: a hash of the first processor's feature flags (machine name as fallback)
cpu_key=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-10)
WHEELS="$CACHE/llama-cpp-python-$LLAMACPP_VERSION-cpu-$cpu_key"
mkdir -p "$WHEELS"
shopt -s nullglob
found=("$WHEELS"/llama_cpp_python-"$LLAMACPP_VERSION"-*.whl)
if [ ${#found[@]} -eq 0 ]; then
    for tool in cc c++; do
        command -v "$tool" >/dev/null \
            || say "warning: no '$tool' on PATH; the build needs a C/C++ compiler (apt-get install build-essential)"
    done
    say "building llama-cpp-python==$LLAMACPP_VERSION from source into $WHEELS (once; 10-20 min on 2 cores)"
    # pip writes the wheel under its final name only when the build succeeded: a killed build leaves none.
    # --no-cache-dir: pip's own wheel cache is not keyed by CPU and could hand back a wheel built elsewhere
    "${PIP[@]}" wheel --no-cache-dir --no-deps "llama-cpp-python==$LLAMACPP_VERSION" -w "$WHEELS"
    found=("$WHEELS"/llama_cpp_python-"$LLAMACPP_VERSION"-*.whl)
    [ ${#found[@]} -gt 0 ] || { say "the build wrote no wheel into $WHEELS" >&2; exit 1; }
    say "built ${found[0]##*/} ($(du -h "${found[0]}" | cut -f1)) in $(( $(date +%s) - start )) s"
else
    say "using the cached wheel ${found[0]}"
fi

say "installing the wheel and its dependencies"
"${PIP[@]}" install -q "${found[0]}"

engine_done "import llama_cpp, numpy; print('[install-llamacpp] llama_cpp', llama_cpp.__version__, '| numpy', numpy.__version__)"
