"""Exports per client: who exported which cache, found by id, dropped with the client.

An export belongs to the client that made it (the connection and generation that
said ``Hello``); an id from another client is refused like a forged client id. A
client has at most ``EXPORTS_PER_CLIENT_MAX`` exports; a new one past that replaces
its oldest. Dropping an export marks it dead first, so a copy thread stops before
its next layer and never writes into a process that is gone.
"""

from __future__ import annotations

import secrets

from kvnode.agent.movers.base import Export

EXPORTS_PER_CLIENT_MAX = 4  # one per KV cache a worker process exports (one, usually)


class ExportRegistry:
    def __init__(self) -> None:
        self.by_id: dict[int, Export] = {}
        self._by_client: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def new_id(self) -> int:
        while True:
            eid = secrets.randbits(62) + 1
            if eid not in self.by_id:
                return eid

    def add(self, export: Export) -> list[Export]:
        """Register ``export``; returns the exports it displaced (to detach)."""
        ids = self._by_client.setdefault(export.client_id, [])
        gone: list[Export] = []
        while len(ids) >= EXPORTS_PER_CLIENT_MAX:
            old = self.by_id.pop(ids.pop(0), None)
            if old is not None:
                old.alive = False
                gone.append(old)
        ids.append(export.export_id)
        self.by_id[export.export_id] = export
        return gone

    def get(self, client_id: int, export_id: int) -> Export | None:
        ex = self.by_id.get(export_id)
        if ex is None or ex.client_id != client_id:
            return None
        return ex

    def drop_client(self, client_id: int) -> list[Export]:
        """The client is gone: its exports are dead from now on."""
        gone = []
        for eid in self._by_client.pop(client_id, []):
            ex = self.by_id.pop(eid, None)
            if ex is not None:
                ex.alive = False
                gone.append(ex)
        return gone

    def values(self) -> list[Export]:
        return list(self.by_id.values())
