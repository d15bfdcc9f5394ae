#!/usr/bin/env bash
# Create .venv (if missing) and install scott with its test extras. Idempotent: a second run
# only checks what is installed. Works offline except for the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# PyTorch: the versions this project is tested with (x86_64 CUDA build, runs on CPU too).
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  if [ "$(uname -m)" = "aarch64" ]; then
    python -m pip install -q torch==2.9.1 torchvision==0.24.1
  else
    python -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
fi
# The package, its runtime deps, pytest and the spconv CUDA wheel (its CPU path is used by tests).
python -m pip install -q -e ".[dev]"
