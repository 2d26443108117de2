"""The one-launch kernel compiled for NVIDIA GPUs (sm_80, sm_90) on a host without one:
triton's own ptxas builds the cubin, so the compiled path (integer-to-pointer casts,
the guarded program body, alignment hints) is checked here, not only under the
interpreter. Aligned plans must compile to 16-byte loads and stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest

pytestmark = pytest.mark.skipif(
    find_spec("triton") is None or find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend (ptxas)",
)

SCRIPT = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from kvnode.kernels import onelaunch
words = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}
out = []
for arch, word, align, gather in json.loads(sys.argv[1]):
    src = triton.compiler.ASTSource(
        fn=onelaunch._chunk_copy,
        signature={"table": "*i64", **{k: "constexpr" for k in ("SEG_MAX", "TILE", "WORD", "ALIGN", "AW", "GATHER")}},
        constexprs={"SEG_MAX": 2, "TILE": onelaunch.TILE_BYTES // word, "WORD": words[word],
                    "ALIGN": align, "AW": align // word, "GATHER": gather},
    )
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
    out.append(sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))))
print(json.dumps(out))
"""

CASES = [
    # (arch, word, align, gather) -> the widest data access expected
    ((90, 8, 16, True), ("ld.global.v2.b64", "st.global.v2.b64")),
    ((90, 8, 16, False), ("ld.global.v2.b64", "st.global.v2.b64")),
    ((80, 8, 16, True), ("ld.global.v2.b64", "st.global.v2.b64")),
    ((90, 4, 16, True), ("ld.global.v4.b32", "st.global.v4.b32")),
    ((90, 8, 8, True), ("st.global.b64",)),
    ((90, 2, 2, False), ("st.global.b16",)),
    ((90, 1, 1, True), ("st.global.b8",)),
]


def test_compiles_for_nvidia_gpus_with_wide_accesses() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([c for c, _ in CASES])],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for (case, wanted), got in zip(CASES, found, strict=True):
        for access in wanted:
            assert access in got, f"{case}: {access} not in {got}"
