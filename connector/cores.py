"""The node's cores as a process sees them: its cgroup's cpuset, in Linux's core list
form (``0-3,8``). The worker's background work uses it to keep off the cores vLLM binds
its compute threads to (``hugepages.off_compute_cores``).
"""

from __future__ import annotations

from pathlib import Path

CPUS_MAX = 1 << 16  # a core list naming more is not a core list


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
