"""The node's cores as a process sees them (its cgroup's cpuset, in Linux's core list
form ``0-3,8``) and the cores the node's bound threads run on. Background work keeps
off the cores vLLM binds its compute threads to: the worker's huge-page collapse
(``connector/hugepages.off_compute_cores``) and the agent's CPU copy threads
(``agent/movers/placement.CorePlacement``); the connector's ``transfer = auto`` picks
agent mode on the CPU where such cores are left (``cores_left``).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

CPUS_MAX = 1 << 16  # a core list naming more is not a core list
THREADS_SCANNED_MAX = 100_000  # threads of the node read for their binding
PF_KTHREAD = 0x00200000  # /proc/<pid>/stat flags: a kernel thread
COPY_CORES_MODES = ("auto", "all")  # agent.cpu_copy_cores: these, or a core list
# kvnode's own background threads (the agent's copy threads, a worker's huge-page
# collapse) are named so, and are not compute threads: each places itself off the
# cores the others' bindings name, so counting one another would leave none.
OWN_THREADS = "kvnode-"
_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def parse_cpu_list(text: str) -> set[int]:
    """Linux's core list form: ``0-3,8,10-11``. Raises ValueError on anything else."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            raise ValueError("an empty item")
        lo, dash, hi = part.partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if not 0 <= first <= last < CPUS_MAX:
            raise ValueError(f"{part!r} is not a core range")
        out.update(range(first, last + 1))
    return out


def node_cpus(root: Path = Path("/")) -> frozenset[int]:
    """The cores this process's cgroup may use (cgroup v2 ``cpuset.cpus.effective``),
    else the online ones: the node's cores as vLLM and the agent see them, whatever
    this thread's own affinity is (vLLM narrows it to its OpenMP core)."""
    base = root / "sys/fs/cgroup"
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                parts = [p for p in line[3:].split("/") if p and p not in (".", "..")]
                for n in range(len(parts), -1, -1):  # the group, then its parents
                    f = base.joinpath(*parts[:n], "cpuset.cpus.effective")
                    text = f.read_text().strip() if f.is_file() else ""
                    if text:
                        return frozenset(parse_cpu_list(text))
    except (OSError, ValueError):
        pass
    try:
        return frozenset(parse_cpu_list((root / "sys/devices/system/cpu/online").read_text()))
    except (OSError, ValueError):
        return frozenset()


def check_cores_setting(value: str, words: Iterable[str]) -> str:
    """'' when ``value`` is one of ``words`` or a core list, else why not."""
    if value in words:
        return ""
    try:
        parse_cpu_list(value)
    except ValueError as exc:
        return f"must be {', '.join(words)} or a core list such as 2-3,6 ({exc})"
    return ""


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``parse_cpu_list``'s form: ``{0, 1, 2, 5}`` -> ``0-2,5``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def node_threads(skip_pids: Iterable[int] = (), proc: Path = Path("/proc")) -> list[str]:
    """The /proc directories of the node's threads this process can see, the kernel's
    own threads (bound to their cores) and ``skip_pids``' left out; at most
    ``THREADS_SCANNED_MAX``."""
    skip = {str(p) for p in skip_pids}
    out: list[str] = []
    try:
        pids = os.listdir(proc)
    except OSError:
        return out
    for pid in pids:
        if not pid.isdigit() or pid in skip:
            continue
        try:
            with open(proc / pid / "stat", "rb") as f:
                flags = int(f.read().rsplit(b")", 1)[1].split()[6])
            if flags & PF_KTHREAD:  # the kernel's per-core threads are bound to theirs
                continue
            tids = os.listdir(proc / pid / "task")
        except (OSError, ValueError, IndexError):  # exited, hidden, or unreadable
            continue
        out += [f"{proc}/{pid}/task/{t}" for t in tids if t.isdigit()]
        if len(out) >= THREADS_SCANNED_MAX:
            break
    return out


def bound_cores(node: frozenset[int], threads: Iterable[str]) -> set[int]:
    """The cores of the threads among ``threads`` (their /proc directories) that are
    bound to fewer than the node's cores: vLLM's compute threads, once it binds them.
    kvnode's own background threads (named ``OWN_THREADS``...) do not count."""
    bound: set[int] = set()
    for path in threads:
        try:
            mask = os.sched_getaffinity(int(path.rsplit("/", 1)[1]))
            if not node - mask or mask & node <= bound:
                continue
            with open(f"{path}/comm", "rb") as f:
                if f.read().startswith(OWN_THREADS.encode()):
                    continue
        except (OSError, ValueError):  # the thread has exited
            continue
        bound |= mask & node
    return bound


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) where ``top -H``, ``ps -L``
    and /proc show it: operators see which of kvnode's threads do what, and
    ``bound_cores`` leaves kvnode's own out (``OWN_THREADS``)."""
    try:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: the name is cosmetic
        pass


def cores_left(node: frozenset[int] | None = None) -> frozenset[int]:
    """The node's cores that no bound thread runs on, when this process's own threads
    are bound (vLLM's compute threads are, once it binds them); empty otherwise: where
    this process's threads may run on every core, no core is left to other work."""
    node = node_cpus() if node is None else node
    try:
        own = bound_cores(node, [f"/proc/self/task/{t}" for t in os.listdir("/proc/self/task")])
    except OSError:
        return frozenset()
    if not own:
        return frozenset()
    return frozenset(node - own - bound_cores(node, node_threads()))  # own: past the scan bound
