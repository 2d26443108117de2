#!/usr/bin/env bash
# GPU checks on a host that has python3 with torch (+CUDA or ROCm) and no network:
#   1. install kvnode's other dependencies from the wheels in .whl/ (cp312 manylinux,
#      prepared on a networked machine) into a throwaway directory,
#   2. make kvnode importable without installing it (a symlink tree, as the package-dir
#      mapping in pyproject.toml lays it out),
#   3. run the kernel tests (GPU tests included: the one-launch chunk kernel compiled on
#      CUDA tensors against the per-layer path),
#   4. the agent-mode GPU tests: workers export their caches with CUDA IPC handles, an
#      agent process opens them and moves a chunk through a shared arena file (two
#      processes on one GPU byte-exact, per-layer interprocess events, an agent restart
#      under an exporting worker, an expandable-segments cache, memory outside torch's
#      default pool refused),
#   5. any other test marked gpu, among them tests/connector/test_connector_gpu.py
#      (cudaHostRegister of the arena follows two agent restarts) and
#      tests/agent/test_mover_gpu.py (the connector's agent mode on CUDA caches through
#      a real agent process),
#   6. benchmarks/gpu_copy_bench.py --shape llama8b and llama70b (one JSON line each).
# Every step's limit is cut to what is left of a 290 s budget, so the whole run stays
# under 5 minutes; prints everything and copies the log and the benchmark JSON to $OUT
# when that is set. Exit status: 0 only if every step passed.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=${WHEEL_DIR:-.whl}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvnode-gpu-check.XXXXXX")
LOG=$WORK/gpu-check.log
BENCH_JSON=$WORK/gpu_copy_bench.json
FAILED=()
BUDGET_S=${GPU_CHECK_BUDGET_S:-290}

finish() {
    echo "== summary: ${#FAILED[@]} failed step(s) ${FAILED[*]:-}"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null  # the log is complete once tee has drained
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp "$LOG" "$OUT/" 2>/dev/null
        [ -s "$BENCH_JSON" ] && cp "$BENCH_JSON" "$OUT/"
    fi
    rm -rf "$WORK"
}
trap finish EXIT
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

step() {  # step NAME SECONDS CMD...: run with a time limit, record a failure
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -le 5 ]; then
        echo "!! $name not run: the ${BUDGET_S}s budget is spent"
        FAILED+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] && echo "!! $name timed out after ${limit}s"
    echo "== $name: rc=$rc in $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    return "$rc"
}

echo "== host: $(hostname) $(date -u +%FT%TZ) $("$PY" --version 2>&1)"
if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi -L
elif command -v rocm-smi >/dev/null; then
    timeout 20 rocm-smi --showproductname
else
    echo "(no nvidia-smi or rocm-smi)"
fi

# 1. dependencies: wheels only, nothing from the network
SITE=$WORK/site
mkdir -p "$SITE"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target "$SITE" "$WHEELS"/*.whl; then
        # No usable pip: a wheel is a zip laid out as site-packages, unpack it as is.
        echo "!! pip install failed; unpacking the wheels directly"
        for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || FAILED+=("unpack:$w"); done
    fi
else
    echo "(no wheels in $WHEELS: using the interpreter's own packages)"
fi

# 2. kvnode importable from the working tree, without installing
SRC=$WORK/src
mkdir -p "$SRC/kvnode"
for f in "$ROOT"/kvnode/*; do ln -s "$f" "$SRC/kvnode/"; done
for sub in agent connector ipc kernels; do
    [ -d "$ROOT/$sub" ] && ln -s "$ROOT/$sub" "$SRC/kvnode/$sub"
done
export PYTHONPATH="$SITE:$SRC${PYTHONPATH:+:$PYTHONPATH}"
# The repo root holds a bare kvnode/ (without the subpackages) that would shadow the
# tree: keep the working directory off sys.path (Python >= 3.11), and have pytest import
# kvnode (-p) before it puts the rootdir on sys.path for the tests package.
export PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis"
step import 60 "$PY" -c '
import torch, kvnode.kernels, kvnode.connector.keys
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda or torch.version.hip)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
'

# 3. tests: the kernels (their GPU tests skip without a GPU), then the other files that
# mark tests gpu (only those files: the rest may need packages this host lacks)
PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider -p kvnode --timeout=120)
AGENT_GPU=tests/kernels/test_kernels_agent_gpu.py
# Without a GPU the device-generic kernel tests would run under Triton's interpreter
# (minutes; `make test` runs them): only the GPU-marked ones are collected, to skip.
KERNEL_MARK='not vllm'
if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" != 1 ]; then
    echo "== no GPU: kernel tests limited to those marked gpu (each skips with its reason)"
    KERNEL_MARK='gpu and not vllm'
fi
step kernel-tests 150 "${PYTEST[@]}" tests/kernels tests/connector/test_keys.py -m "$KERNEL_MARK" \
    --ignore="$AGENT_GPU"
step agent-mode-gpu 100 "${PYTEST[@]}" "$AGENT_GPU"
mapfile -t GPU_FILES < <(grep -rlE 'mark\.gpu|"gpu"' tests --include='test_*.py' | grep -v '^tests/kernels/' | sort)
if [ "${#GPU_FILES[@]}" -gt 0 ]; then
    # the arena test starts three agents
    step gpu-marked-tests 90 "${PYTEST[@]}" -m 'gpu and not vllm' "${GPU_FILES[@]}"
else
    echo "== gpu-marked-tests: no other test file marks tests gpu"
fi

# 4. benchmarks: one JSON line per shape, all of them kept
for shape in llama8b llama70b; do
    step "bench-$shape" 60 bash -c "\"$PY\" benchmarks/gpu_copy_bench.py --shape $shape | tee -a \"$BENCH_JSON\"; exit \${PIPESTATUS[0]}"
done

[ "${#FAILED[@]}" -eq 0 ]
