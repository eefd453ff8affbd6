#!/usr/bin/env bash
# Create .venv (if needed) and install hf_edit with its test dependencies.
# torch is installed FIRST, so that a CPU build (or any build you choose with TORCH_SPEC) is used instead of
# letting a plain "torch" requirement pull the newest CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
