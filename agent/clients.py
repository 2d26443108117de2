"""A registered client: who it is, what it holds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    leases: set[bytes] = field(default_factory=set)
    pins: Counter[bytes] = field(default_factory=Counter)
    # key -> when its first pin still held was taken; insertion order is age order, so
    # expiry looks only at the oldest (see ``expired_pins``)
    pinned_at: dict[bytes, float] = field(default_factory=dict)
    pins_held: int = 0  # sum of ``pins``: a key pinned twice counts twice
    fd: int = -1  # the connection's socket fd in the agent (zmq.SRCFD of its Hello)
    pidfd: int = -1  # watches the process when it is in the agent's pid namespace

    def pin(self, key: bytes, now: float) -> None:
        n = self.pins[key]
        if not n:
            self.pinned_at[key] = now
        self.pins[key] = n + 1
        self.pins_held += 1

    def unpin(self, key: bytes) -> bool:
        """Give up one of this client's pins of ``key``; False when it holds none."""
        n = self.pins.get(key, 0)
        if not n:
            return False
        if n == 1:
            del self.pins[key]
            del self.pinned_at[key]
        else:
            self.pins[key] = n - 1
        self.pins_held -= 1
        return True

    def expired_pins(self, taken_before: float) -> list[tuple[bytes, int]]:
        """Forget every pin of keys first pinned before ``taken_before``: (key, count)
        for the caller to undo in the index. Looks at the expired ones only."""
        old: list[bytes] = []
        for key, at in self.pinned_at.items():
            if at >= taken_before:
                break
            old.append(key)
        out: list[tuple[bytes, int]] = []
        for key in old:
            n = self.pins.pop(key)
            del self.pinned_at[key]
            self.pins_held -= n
            out.append((key, n))
        return out


def process_start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
