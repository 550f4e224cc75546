#!/usr/bin/env bash
# Make ./.venv with leedl_fast installed in editable mode, plus the extras named
# in $1 (e.g. "test" or "demo,test").  Idempotent: a second run with the same
# setup.py and extras does nothing.
#
# torch: a Python that already imports a CUDA build of torch keeps it (the venv
# then sees the system site-packages).  Otherwise the venv gets torch==2.13.0
# (the CPU build), triton==3.6.0 (the version the GPU machines run) and
# numpy<2.4 (triton 3.6's interpreter breaks on numpy 2.4, see
# shared/TRITON_ON_CPU.md).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed-$(echo "$EXTRAS" | tr ',' '-')"

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        echo "bootstrap: using the CUDA torch of $PYTHON"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    $PIP install --quiet "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
fi
$PIP install --quiet -e ".[$EXTRAS]"
touch "$STAMP"
