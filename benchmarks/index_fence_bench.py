"""What the shared lookup index's memory fences cost: a reader's ``contains_many`` of
64 keys (half present) and a writer's insert + remove, with the fences the seqlocks
use (``shmindex.fence``) against the same calls with the fence made a no-op (the
order x86 alone would give), called in turns in one process. Prints one JSON object:
medians over the repeats (with min and max) in microseconds per call, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from kvnode.ipc import shmindex as S


def _per_call_us(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
            "max": round(max(xs), 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    name = f"/kvnode-bench-fence-{uuid.uuid4().hex[:12]}"
    w = S.ShmIndexWriter(name, S.capacity_for(65536))
    r = S.ShmIndexReader(name)
    real_fence = S.fence
    try:
        present = [os.urandom(16) for _ in range(32)]
        for k in present:
            w.insert(k)
        keys = present + [os.urandom(16) for _ in range(32)]
        churn = os.urandom(16)

        def read() -> None:
            r.contains_many(keys)

        def write() -> None:
            w.insert(churn)
            w.remove(churn)

        out: dict[str, dict[str, list[float]]] = {"lookup_64": {}, "insert_remove": {}}
        for label, fn in (("lookup_64", read), ("insert_remove", write)):
            fenced, bare = [], []
            for _ in range(args.repeats):
                w.touch()  # the writer's heartbeat: readers refuse a silent index
                S.fence = real_fence
                fenced.append(_per_call_us(fn, args.calls))
                S.fence = lambda: None
                w.touch()
                bare.append(_per_call_us(fn, args.calls))
            out[label] = {"fenced": fenced, "no_fence": bare}
        S.fence = real_fence
        result = {
            name: {
                "fenced_us": _spread(v["fenced"]),
                "no_fence_us": _spread(v["no_fence"]),
                "ratio": round(
                    statistics.median(v["fenced"]) / statistics.median(v["no_fence"]), 3
                ),
            }
            for name, v in out.items()
        }
        result["fence_us"] = _spread([_per_call_us(real_fence, 20000) for _ in range(args.repeats)])
        print(json.dumps(result))
    finally:
        S.fence = real_fence
        r.close()
        w.close()


if __name__ == "__main__":
    main()
