#!/usr/bin/env bash
# Type-checks the package as it is imported (kvnode.agent <- agent/, ...): mypy cannot
# follow setuptools' package-dir mapping, so check a link tree laid out like the install.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.cache/typecheck
rm -rf "$tree" && mkdir -p "$tree/kvnode"
for f in kvnode/*.py; do ln -s "$PWD/$f" "$tree/kvnode/"; done
for sub in agent connector ipc kernels; do ln -s "$PWD/$sub" "$tree/kvnode/$sub"; done
exec "${MYPY:-.venv/bin/mypy}" --config-file pyproject.toml "$tree/kvnode"
