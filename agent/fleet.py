"""What the agent shares beyond its own processes: peer agents (a miss here is fetched
from a peer that has the chunk) and KV events for cache-aware routers. Built by the
composition root, driven from the agent loop; nothing here blocks the loop, and nothing
here changes the cache: fetched chunks land through the cache, which also writes the
events (this only sends them)."""

from __future__ import annotations

import logging
from typing import Any

from kvnode.agent.events import EventPublisher
from kvnode.agent.peers import PeerManager, PeerServer

log = logging.getLogger("kvnode.agent")


class Fleet:
    def __init__(
        self,
        server: PeerServer | None,
        peers: PeerManager | None,
        events: EventPublisher | None,
    ) -> None:
        self.server = server
        self.peers = peers
        self.events = events

    def sockets(self) -> list[Any]:
        out: list[Any] = []
        if self.server is not None:
            out.append(self.server.socket)
        if self.events is not None:
            out.extend(self.events.sockets())
        return out

    def on_readable(self) -> None:
        if self.server is not None:
            self.server.handle()

    def on_lookup_miss(self, keys: list[bytes], parent: bytes | None) -> set[bytes]:
        """Keys a peer will be asked for (the client is told PENDING)."""
        if self.peers is None or not keys:
            return set()
        return self.peers.on_lookup_miss(keys, parent=parent)

    def poll(self) -> None:
        if self.peers is not None:
            self.peers.poll()
        if self.server is not None:
            self.server.poll()

    def flush(self) -> None:
        if self.events is not None:
            self.events.flush()

    def busy(self) -> bool:
        return bool(
            (self.peers is not None and self.peers.busy())
            or (self.server is not None and self.server.busy())
        )

    def reload(self) -> None:
        if self.events is not None:
            self.events.reload_keys()  # its own copy of the fleet's authorized keys
        if self.peers is not None:
            self.peers.reload_keys()
        elif self.server is not None and self.server.curve is not None:
            self.server.curve.ring.reload()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.peers is not None:
            out["peers"] = self.peers.stats()
        if self.server is not None:
            out["peers_server"] = self.server.stats()
        if self.events is not None:
            out["events"] = self.events.stats()
        return out

    def close_peers(self) -> None:
        for part in (self.peers, self.server):
            if part is not None:
                try:
                    part.close()
                except Exception:
                    log.exception("closing %s failed", type(part).__name__)

    def close(self) -> None:
        self.close_peers()
        if self.events is not None:
            try:
                self.events.flush()
                self.events.close()
            except Exception:
                log.exception("closing the event publisher failed")
