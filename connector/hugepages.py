"""Huge pages under a CPU KV cache.

vLLM's CPU cache is one large torch allocation per layer (or one shared), backed by
4 KiB pages. Cross-memory attach pins every page it copies, and pinning 4 KiB pages
holds ``process_vm_readv`` to about two thirds of memcpy's rate; over 2 MiB pages it
copies at memcpy's rate (``benchmarks/agent_copy_bench.py``). So the worker asks the
kernel to back its cache with transparent huge pages: ``MADV_HUGEPAGE`` for pages
faulted later and ``MADV_COLLAPSE`` (Linux 6.1) to turn the pages it has now into huge
pages, on a background thread, a step at a time, so registration never waits for it.

Contents never change: the kernel copies the pages into huge pages while they stay
readable and writable. Everything here is best effort: an older kernel, a kernel
without huge pages, or no free huge page leaves the cache as it was (counted, logged
once at debug level).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger("kvnode.connector")

HUGE = 2 << 20
STEP = 64 << 20  # collapsed per system call: the thread lets others in between
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def aligned(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned interiors of ``(address, bytes)`` ranges, overlaps merged:
    a huge page never reaches outside the cache's own allocation."""
    spans = []
    for addr, n in ranges:
        lo = (addr + HUGE - 1) // HUGE * HUGE
        hi = (addr + n) // HUGE * HUGE
        if hi > lo:
            spans.append((lo, hi))
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return [(lo, hi - lo) for lo, hi in out]


class Collapse:
    """Collapse ``ranges`` into huge pages on a daemon thread. ``done`` is set when
    it has finished (or given up); ``collapsed``/``failed`` count bytes."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.ranges = aligned(ranges)
        self.collapsed = 0
        self.failed = 0
        self.why = ""
        self.done = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvnode-hugepages", daemon=True)

    def start(self) -> Collapse:
        if self.ranges:
            self._thread.start()
        else:
            self.done.set()
        return self

    def stop(self) -> None:
        self._stop = True

    def _run(self) -> None:
        try:
            for addr, n in self.ranges:
                if _libc.madvise(addr, n, MADV_HUGEPAGE) != 0:
                    self._give_up("MADV_HUGEPAGE", n)
                    continue
                for off in range(0, n, STEP):
                    if self._stop:
                        return
                    step = min(STEP, n - off)
                    if _libc.madvise(addr + off, step, MADV_COLLAPSE) == 0:
                        self.collapsed += step
                    else:
                        self._give_up("MADV_COLLAPSE", step)
        finally:
            self.done.set()
            if self.failed:
                log.debug(
                    "kvnode: %d of %d KV cache bytes stay on small pages (%s)",
                    self.failed, self.failed + self.collapsed, self.why,
                )  # fmt: skip

    def _give_up(self, what: str, n: int) -> None:
        err = ctypes.get_errno()
        self.failed += n
        self.why = self.why or f"{what}: {os.strerror(err)}"


__all__ = ["Collapse", "aligned"]
