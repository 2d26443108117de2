"""Where the CPU mover's copy threads run: off the cores vLLM computes on.

vLLM's CPU backend binds one OpenMP compute thread to each core it uses
(``VLLM_CPU_OMP_THREADS_BIND``) and may leave cores to other work; a process started
on a core list does the same. The agent's copy threads, left to the kernel, land on
any core, the bound ones included, and a copy there takes the core from a compute
thread that the whole forward pass then waits for (OpenMP's team goes at its slowest
thread's pace). Measured with ``benchmarks/vllm_ttft.py --transfer agent --vllm-cpus
0`` on 2 cores (vLLM on core 0, the agent free): hits took 1.148 of vLLM's own prefix
cache with the copies forced onto core 0 (``agent.cpu_copy_cores = 0``), 1.088-1.105
placed (six runs) and 1.098 left to the kernel on that otherwise idle machine, where
the kernel found the free core by itself; on a busy node it need not.

``auto`` (``agent.cpu_copy_cores``, the default): the copy threads run on the node's
cores that no bound thread runs on, and a job uses no more threads than there are
such cores; the agent's own threads do not count, nor the kernel's per-core ones.
Where no core is left free (vLLM's threads may run on every core, or it binds them
all) they run on the agent's own cores. The bindings are read again when a worker
exports or its export goes, and every ``RESCAN_S`` (a vLLM process that binds later,
or one in worker mode that started since). A core list names the cores instead.
Either way each copy thread of a job is pinned to a core of its own (thread ``k`` on
the ``k``-th core, around again when a job has more threads than cores): left to the
kernel, a job's two copy threads shared one core while the other was free in 27 of
48 samples of ``agent_copy_bench.py`` here (the kernel wakes a helper on the core of
the thread that woke it); spread, the bench reached 0.69-0.72 of memcpy against
0.61-0.64 left to the kernel (three alternated runs each). ``all`` leaves the
threads to the kernel. The threads stay
inside the agent's own affinity (systemd's ``CPUAffinity=``, ``taskset``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from kvnode.cores import (
    COPY_CORES_MODES,
    bound_cores,
    check_cores_setting,
    format_cpu_list,
    name_thread,
    node_cpus,
    node_threads,
    parse_cpu_list,
)

log = logging.getLogger("kvnode.agent")

RESCAN_S = 30.0  # the node's bindings are read again this often while the mover lives


def _bound_elsewhere(node: frozenset[int]) -> set[int]:
    """The cores the node's bound threads run on, this process's left out."""
    return bound_cores(node, node_threads(skip_pids=(os.getpid(),)))


class CorePlacement:
    """The cores the copy threads run on: ``cores`` (``auto``: the free ones; a core
    list: those of the agent's), else the agent's own, one thread a core
    (``spread``); ``all``: wherever the kernel puts them. ``apply`` on a copy thread
    moves it to its core when that changed since it last looked; ``team`` is how many
    threads a job uses."""

    def __init__(
        self,
        mode: str = "auto",
        node: Callable[[], frozenset[int]] = node_cpus,
        scan: Callable[[frozenset[int]], set[int]] = _bound_elsewhere,
        rescan_s: float = RESCAN_S,
        allowed: frozenset[int] | None = None,
    ) -> None:
        why = check_cores_setting(mode, COPY_CORES_MODES)
        if why:
            raise ValueError(f"agent.cpu_copy_cores {mode!r}: {why}")
        self.mode = mode
        # The agent's own cores (systemd's CPUAffinity=, taskset), read at start.
        self.allowed = frozenset(os.sched_getaffinity(0) if allowed is None else allowed)
        self.cores: frozenset[int] = frozenset()
        # What ``spread`` returns, kept as ``cores`` changes (asked at every job).
        self._spread = () if mode == "all" else tuple(sorted(self.allowed))
        self._node, self._scan, self._rescan_s = node, scan, rescan_s
        self._local = threading.local()
        self._wanted = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if mode == "all":
            return
        if mode != "auto":
            cores = frozenset(parse_cpu_list(mode)) & self.allowed
            if not cores:
                log.warning(
                    "agent.cpu_copy_cores %s: none of those cores is the agent's (%s); "
                    "the copy threads run on its own cores instead",
                    mode, format_cpu_list(self.allowed),
                )  # fmt: skip
            self._set(cores)
            return
        self._wanted.set()  # a first reading at once
        self._thread = threading.Thread(target=self._run, name="kvnode-placement", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """A worker exported or its export went: read the bindings again (``auto``)."""
        self._wanted.set()

    def refresh(self) -> frozenset[int]:
        """Read the node's bindings now (``auto``) and place the threads by them."""
        node = frozenset(self._node()) & self.allowed
        bound = self._scan(node) & node
        free = frozenset(node - bound) if bound else frozenset()
        self._set(free)
        return free

    def _set(self, cores: frozenset[int]) -> None:
        if cores == self.cores:
            return
        self.cores = cores  # the copy threads move at their next unit
        self._spread = tuple(sorted(cores or self.allowed))
        if self.mode == "auto":
            log.info(
                "CPU copy threads: %s",
                f"cores {format_cpu_list(cores)}, one thread a core (vLLM computes on the others)"
                if cores
                else f"the agent's cores {format_cpu_list(self.allowed)}, one thread a core "
                "(no core is free of bound compute threads)",
            )

    def spread(self) -> tuple[int, ...]:
        """The cores the copy threads are spread over, one thread a core: ``cores``,
        else the agent's own; none for ``all``."""
        return self._spread

    def target(self, slot: int) -> frozenset[int]:
        """Where copy thread ``slot`` of a job (0: the thread that runs it) runs."""
        cores = self.spread()
        if not cores:
            return self.allowed
        return frozenset((cores[slot % len(cores)],))

    def apply(self, slot: int = 0) -> None:
        """On a copy thread: move it to its core (``target``) when that changed since
        this thread last moved."""
        target = self.target(slot)
        if getattr(self._local, "mask", self.allowed) == target:
            return
        self._local.mask = target
        try:
            os.sched_setaffinity(0, target)
        except OSError as exc:  # a core gone offline, or a cpuset that shrank
            log.debug("a copy thread stays on its cores: %s", exc)

    def team(self, threads: int) -> int:
        """Threads a job uses out of ``threads``: no more than the cores it runs on."""
        cores = self.cores
        return max(1, min(threads, len(cores))) if cores else threads

    def stats(self) -> dict[str, object]:
        cores = self.spread()
        return {
            "copy_cores_mode": self.mode,
            "copy_cores": format_cpu_list(cores) if cores else "any",
        }

    def _run(self) -> None:
        name_thread("kvnode-placement")
        while True:
            self._wanted.wait(self._rescan_s)
            self._wanted.clear()
            if self._stopping:
                return
            try:
                self.refresh()
            except Exception:  # never the copies' problem: they stay where they are
                log.exception("reading the node's thread bindings failed")

    def close(self) -> None:
        self._stopping = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["RESCAN_S", "CorePlacement"]
