#!/usr/bin/env bash
# Runs the tests on another supported torch than CI's 2.13, in a virtual environment of its own
# (.venv-torch<VERSION>): the ends of the supported range get checked before a GPU session finds their differences
# (2.11 found two on 2026-12-04).
#
#     bash scripts/test_torch.sh                 # the oldest supported, 2.11
#     bash scripts/test_torch.sh 2.14 tests/ops  # the newest, some tests (the other arguments go to pytest)
#
# PyPI's torch is its CUDA build (about 3.5 GB with its libraries on first use; 5.4 GB for 2.14) and brings the
# Triton it was built with. It runs on a CPU machine too; the kernels are then interpreted, which Triton 3.6
# (torch 2.11's) can do only with numpy < 2.4 (tests/conftest.py skips them, with that reason, where numpy is newer).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-2.11}
[ $# -gt 0 ] && shift
case "$VERSION" in
    2.11) extra=("numpy<2.4") ;;
    2.12|2.13|2.14) extra=() ;;
    *) echo "supported: torch 2.11 to 2.14, not '$VERSION'" >&2; exit 2 ;;
esac
VENV=${DYLLM_VENV:-.venv-torch$VERSION}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('$VERSION.') else 1)" 2>/dev/null; then
    pip_install "torch==$VERSION.*" "${extra[@]}"
fi
pip_install -e ".[test]"
"$PY" -c "import torch, triton, numpy; print(f'torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
if [ $# -eq 0 ]; then
    set -- tests
fi
exec "$PY" -m pytest -q -ra -n 2 --dist loadscope "$@"
