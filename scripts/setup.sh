#!/usr/bin/env bash
# Create .venv (if missing) and install baklava with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
# The CPU build of torch: on our machines 'torch==2.13.0' resolves to a local CPU wheel; a range
# would pull a multi-GB CUDA build from PyPI.
python -c "import torch" 2>/dev/null || python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev,serving,onnx]"
