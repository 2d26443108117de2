"""Facts about processes that the agent and its clients compare."""

from __future__ import annotations

import os
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pid_namespace() -> int:
    """Inode of this process's pid namespace (0 when unknown): pids compare only
    between processes that share it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def lock_text() -> str:
    """What the agent writes in its runtime directory's lock file: its pid and pid
    namespace (a client of its uid watches that pid while its Hello waits)."""
    return f"{os.getpid()} {pid_namespace()}\n"


def lock_owner(text: str) -> tuple[int, int]:
    """(pid, pid namespace) from a lock file's text; 0 for a part that is missing or
    not a number."""
    words = text[:64].split()
    pid = int(words[0]) if words and words[0].isdigit() else 0
    ns = int(words[1]) if len(words) == 2 and words[1].isdigit() else 0
    return pid, ns


def boot_clock_s() -> float:
    """Seconds since boot (CLOCK_BOOTTIME): the clock process start times count on."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def start_time_s(pid: int) -> float:
    """When process ``pid`` started, in ``boot_clock_s`` seconds, rounded down to a
    clock tick; 0.0 when there is no such process. Both come from the kernel's one
    boot-time clock, so a start later than a moment taken with ``boot_clock_s`` means
    the process did not exist at that moment."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19]) / _CLK_TCK  # field 22, starttime
    except (IndexError, ValueError):
        return 0.0


def drain_pipe(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty (its bytes only say "look again")."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # BlockingIOError: empty now
        pass
