"""A registered client: who it is (what it holds is booked in the index, per owner)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Client:
    client_id: int
    name: str
    pid: int
    pid_ns: int
    identity: bytes
    last_seen: float
    connected_at: float = 0.0  # boot-clock time its connection was seen: against pid reuse
    fd: int = -1  # the connection's socket fd in the agent (zmq.SRCFD of its Hello)
    pidfd: int = -1  # watches the process when it is in the agent's pid namespace
