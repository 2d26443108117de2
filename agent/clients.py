"""Registered clients, their leases and pins, and how the agent notices they died."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import psutil


def own_pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(slots=True, eq=False)
class Client:
    client_id: int
    name: str
    pid: int
    pid_ns: int
    identity: bytes
    last_seen: float
    started: float = 0.0  # process create time, guards against pid reuse
    leases: set[bytes] = field(default_factory=set)
    pins: Counter[bytes] = field(default_factory=Counter)
    fd: int = -1  # the connection's socket fd in the agent (zmq.SRCFD of its Hello)
    pidfd: int = -1  # watches the process when it is in the agent's pid namespace

    def process_alive(self, agent_pid_ns: int) -> bool | None:
        """True/False when the pid can be checked from here; None when it cannot
        (another pid namespace: heartbeats decide)."""
        if not self.pid or not self.pid_ns or self.pid_ns != agent_pid_ns:
            return None
        try:
            proc = psutil.Process(self.pid)
            if self.started and abs(proc.create_time() - self.started) > 0.5:
                return False  # pid reused by another process
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return None


def process_start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
