# Sourced by the engine installers: `engine_venv NAME VENV_DIR` checks the arguments, stops early (exit 0) when
# VENV_DIR/.stamp-engine says a previous install finished, creates the venv when missing, and sets
#   VENV, STAMP, PIP (an array: the venv's pip), start (seconds), and say() (messages prefixed with NAME).
# `engine_done "import ..."` runs the import check and only then touches the stamp, so a half install is never
# taken as done.
PYTHON="${PYTHON:-python3}"

engine_venv() {
    local name="$1"
    shift
    if [ $# -ne 1 ]; then
        echo "usage: install-$name.sh VENV_DIR   (e.g. .venv-$name)" >&2
        exit 2
    fi
    VENV="$1"
    STAMP="$VENV/.stamp-engine"
    eval "say() { echo \"[install-$name] \$*\"; }"
    if [ -f "$STAMP" ]; then
        say "$VENV is complete ($STAMP exists); remove that file to reinstall"
        exit 0
    fi
    start=$(date +%s)
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating venv $VENV with $($PYTHON --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    PIP=("$VENV/bin/python" -m pip)
}

engine_done() {
    say "checking: $1"
    "$VENV/bin/python" -c "$1"
    touch "$STAMP"
    say "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
}
