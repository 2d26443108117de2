"""A registered client: who it is (what it holds is booked in the index, per owner)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(slots=True, eq=False)
class Client:
    client_id: int
    name: str
    pid: int
    pid_ns: int
    identity: bytes
    last_seen: float
    started: float = 0.0  # process create time, guards against pid reuse
    fd: int = -1  # the connection's socket fd in the agent (zmq.SRCFD of its Hello)
    pidfd: int = -1  # watches the process when it is in the agent's pid namespace


def process_start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
