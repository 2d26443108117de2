#!/usr/bin/env bash
# On a machine with network access: download the wheels `make gpu-check` installs on an
# offline GPU host (CPython 3.12, x86_64 manylinux) into .whl/. torch is not among them:
# the GPU host brings its own CUDA/ROCm build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
DEST=${WHEEL_DIR:-.whl}
mkdir -p "$DEST"
PKGS=(
    pyzmq==27.3.0 posix-ipc==1.3.2 msgspec==0.22.0 psutil==7.2.2 lz4==4.4.5 xxhash==4.1.0
    sortedcontainers==2.4.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
    pytest==9.2.0 pytest-timeout==2.4.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4
    hypothesis==6.170.17 attrs==26.1.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PKGS[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST ($(du -sh "$DEST" | cut -f1))"
