"""Huge pages under a CPU KV cache.

vLLM's CPU cache is one large torch allocation per layer (or one shared), backed by
4 KiB pages. Cross-memory attach pins every page it copies, and pinning 4 KiB pages
holds ``process_vm_readv`` to about two thirds of memcpy's rate; over 2 MiB pages it
copies at memcpy's rate (``benchmarks/agent_copy_bench.py``). So the worker asks the
kernel to back its cache with transparent huge pages: ``MADV_HUGEPAGE`` for pages
faulted later and ``MADV_COLLAPSE`` (Linux 6.1) to turn the pages it has now into huge
pages, on a background thread, a step at a time, so registration never waits for it.

The collapse holds the process's mmap lock for writing while it copies each 2 MiB
into its huge page, and cross-memory attach needs that lock to reach the worker's
pages: measured, an 8-chunk load into a fresh worker took 100-125 ms while its 2 GiB
cache collapsed in 64 MiB calls, against 5-11 ms without the collapse. So it yields
to the agent's copies (``busy``: a job of this worker in flight): while one is, it
collapses one ``STEP`` (one huge page, well under a millisecond) at most every
``BUSY_STEP_EVERY_S``, and at full speed otherwise. It goes in stripes, the first
``STEP`` of every range before the second of any: vLLM hands out a fresh cache's
blocks from the lowest ids, so the blocks early requests use (in every layer) are
on huge pages first.

The collapse thread runs on the node's cores that vLLM's compute threads are not
bound to (``off_compute_cores``: vLLM's OpenMP binding, or a process started on a
core list, leaves such cores; those of other ranks and other bound processes on the
node count too, the kernel's own per-core threads do not); it would otherwise
inherit one of vLLM's compute cores from the thread that starts it. Where there is
no such core (vLLM's threads may run on every core, as with
``VLLM_CPU_OMP_THREADS_BIND=nobind``) it does not collapse unless told to
(``kvnode.hugepages = always``; the kernel's khugepaged may still collapse the
``MADV_HUGEPAGE`` ranges at its own slow pace): measured with
``benchmarks/vllm_ttft.py --transfer agent`` on 2 cores, every hit in the first pass
over the prompts took 0.50 s in the fresh process whose 2 GiB cache collapsed and
0.45 s in the vLLM process beside it (whose OpenMP team lost a core), against 0.072
s and 0.062 s without the collapse; once it had finished, hits took 0.067-0.070 s,
as without it (0.068 s). Paced to a tenth of a core it took 0.094 s and 0.071 s in
the first pass but 0.080-0.089 s in the later ones, while it went on. What huge
pages gain is the agent's copy rate: ``agent_copy_bench.py`` 0.66-0.70 of memcpy
with them against 0.63 without, same hour. With vLLM on core 0 of 2 (``vllm_ttft.py
--vllm-cpus 0``), the collapse on core 1 left the prefix-cache hits of the process
beside it at 0.099 s, against 0.20-0.21 s (three runs) while it shared core 0.

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
import time
from collections.abc import Callable, Iterable

from kvnode.cores import cores_left, name_thread

log = logging.getLogger("kvnode.connector")

HUGE = 2 << 20
STEP = 2 << 20  # collapsed per system call: a copy that comes waits for one at most
BUSY_STEP_EVERY_S = 0.25  # while the agent copies for the worker: one STEP at most this often
BUSY_RECHECK_S = 0.002  # how often a yielding collapse asks again
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def off_compute_cores(node: frozenset[int] | None = None) -> frozenset[int]:
    """Move the calling thread to the node's cores that no bound thread runs on, when
    this process's own threads are bound (vLLM's compute threads are) and such cores
    exist; returns those cores (empty: the thread stays where it was). Every thread
    on the node that can be seen counts, not only this process's: the other ranks of
    a vLLM with several bind their compute threads to the cores this one leaves."""
    try:
        free = cores_left(node)
        if free:
            os.sched_setaffinity(0, free)
            return free
    except (OSError, ValueError):
        log.debug("kvnode: the collapse stays on its cores", exc_info=True)
    return frozenset()


def _madvise(addr: int, n: int, advice: int) -> int:
    return int(_libc.madvise(addr, n, advice))


def stripes(ranges: list[tuple[int, int]], step: int) -> list[tuple[int, int]]:
    """``(address, bytes)`` steps of at most ``step`` bytes covering ``ranges``: the
    first step of every range, then the second of every range, and so on."""
    out: list[tuple[int, int]] = []
    longest = max((n for _, n in ranges), default=0)
    for off in range(0, longest, step):
        out += [(addr + off, min(step, n - off)) for addr, n in ranges if off < n]
    return out


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
    it has finished (or given up); ``collapsed``/``failed`` count bytes. ``busy``:
    whether the agent copies for the worker now (the collapse then yields, above);
    ``yielded_s`` counts the time it waited for its turn. ``shared``: collapse even
    where no core is free of vLLM's compute threads (else ``skipped`` counts the bytes
    left on small pages)."""

    def __init__(
        self,
        ranges: Iterable[tuple[int, int]],
        busy: Callable[[], bool] | None = None,
        step: int = STEP,
        shared: bool = False,
    ) -> None:
        self.ranges = aligned(ranges)
        self.collapsed = 0
        self.failed = 0
        self.why = ""
        self.yielded_s = 0.0
        self.cores: frozenset[int] = frozenset()  # where it ran, when moved off vLLM's
        self.skipped = 0  # bytes left on small pages: no core off vLLM's to collapse on
        self.done = threading.Event()
        self._stop = False
        self._busy = busy
        self._step = step
        self._last = -BUSY_STEP_EVERY_S  # monotonic: when the last step ran
        self._shared = shared  # collapse on vLLM's compute cores too
        self._thread = threading.Thread(target=self._run, name="kvnode-hugepages", daemon=True)

    def start(self) -> Collapse:
        if self.ranges:
            self._thread.start()
        else:
            self.done.set()
        return self

    def stop(self) -> None:
        self._stop = True

    def _turn(self) -> bool:
        """Wait until the next step may run (no copy for the worker, or its interval
        up); False once stopped."""
        t0 = time.monotonic()
        while not self._stop:
            now = time.monotonic()
            if now - self._last >= BUSY_STEP_EVERY_S or not self._copying():
                self.yielded_s += now - t0
                self._last = now
                return True
            time.sleep(BUSY_RECHECK_S)
        return False

    def _copying(self) -> bool:
        if self._busy is None:
            return False
        try:
            return self._busy()
        except Exception:  # a bug there must not stop the collapse: it goes on unpaced
            log.debug("kvnode: the collapse's busy check failed", exc_info=True)
            return False

    def _run(self) -> None:
        name_thread("kvnode-collapse")  # not one of vLLM's: other scans leave it out
        try:
            self.cores = off_compute_cores()
            ranges = []
            for addr, n in self.ranges:
                if _madvise(addr, n, MADV_HUGEPAGE) != 0:
                    self._give_up("MADV_HUGEPAGE", n)
                else:
                    ranges.append((addr, n))
            if not self.cores and not self._shared:
                self.skipped = sum(n for _, n in ranges)
                log.debug(  # khugepaged may still collapse it, at the kernel's own pace
                    "kvnode: no collapse of the KV cache (no core free of vLLM's compute "
                    "threads to run it on; kvnode.hugepages = always runs it anyway)"
                )
                return
            for addr, n in stripes(ranges, self._step):
                if not self._turn():
                    return
                if _madvise(addr, n, MADV_COLLAPSE) == 0:
                    self.collapsed += n
                else:
                    self._give_up("MADV_COLLAPSE", n)
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


__all__ = ["Collapse", "aligned", "stripes"]
