#!/usr/bin/env bash
# Sets up .venv with dyllm-compile (editable) and its test extras.
# On a machine without an NVIDIA GPU it installs torch's CPU wheel first: a bare `torch`
# requirement with no torch installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DYLLM_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install "torch>=2.11,<2.15"
    else
        # torch==2.13.0 resolves to the CPU wheel on this project's machines; elsewhere ask
        # PyTorch's CPU index explicitly.
        pip_install torch==2.13.0 || pip_install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    fi
fi

extras="test"
# Triton on CPU runs the kernels under TRITON_INTERPRET=1; a CUDA torch brings its own Triton.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    extras="test,triton"
fi
pip_install -e ".[${extras}]"
"$PY" -c "import torch, dyllm_compile; print(f'dyllm-compile ready: torch {torch.__version__}, python $("$PY" -V | cut -d' ' -f2)')"
