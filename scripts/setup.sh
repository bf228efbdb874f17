#!/usr/bin/env bash
# Create .venv and install matbalora with everything it needs (idempotent). CPU torch from the
# pinned wheel: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where the index would serve the CUDA build
python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -q -e ".[test,app,sources,cluster,sevennet]"
