#!/usr/bin/env bash
# Runs the tests on the oldest supported torch (2.11) in a virtual environment of its own (.venv-torch2.11), where
# CI runs torch 2.13: the floor of the supported range gets checked before a GPU session finds its differences
# (it found two on 2026-12-04). Arguments go to pytest (default: the whole suite).
#
# PyPI's torch 2.11 is its CUDA build, with Triton 3.6: a download of about 3.5 GB on first use. It runs on a CPU
# machine too; the kernels are then interpreted, which Triton 3.6 can do only with numpy < 2.4 (tests/conftest.py
# skips them, with that reason, where numpy is newer).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DYLLM_VENV:-.venv-torch2.11}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('2.11.') else 1)" 2>/dev/null; then
    pip_install "torch==2.11.*" "numpy<2.4"
fi
pip_install -e ".[test]"
"$PY" -c "import torch, triton, numpy; print(f'torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
if [ $# -eq 0 ]; then
    set -- tests
fi
exec "$PY" -m pytest -q -ra -n 2 --dist loadscope "$@"
