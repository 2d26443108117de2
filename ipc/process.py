"""Facts about processes that the agent and its clients compare."""

from __future__ import annotations

import os


def pid_namespace() -> int:
    """Inode of this process's pid namespace (0 when unknown): pids compare only
    between processes that share it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
