#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools. Safe to run repeatedly.
# torch is installed first, pinned, when absent: the project's own requirement is a range, and resolving that
# range from scratch on Linux pulls a multi-GB CUDA build. The pinned version is the CPU wheel these CI machines
# hold locally; elsewhere set MAESTRO_TORCH_VERSION, and MAESTRO_TORCH_INDEX (e.g. PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==${MAESTRO_TORCH_VERSION:-2.13.0}" \
    ${MAESTRO_TORCH_INDEX:+--index-url "$MAESTRO_TORCH_INDEX"}
fi
python -m pip install --quiet -e ".[test]"
