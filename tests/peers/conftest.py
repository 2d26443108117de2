"""Peers under test: each node is a real Index over a real shared-memory arena, with a
real PeerServer and PeerManager on 127.0.0.1 and real CURVE certificates. The test
plays the agent loop (``Node.step``), so time and ordering stay in the test's hands."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from kvnode.agent.cache import Cache
from kvnode.agent.config import load_config
from kvnode.agent.index import Index
from kvnode.agent.peers import (
    Curve,
    Fetched,
    PeerManager,
    PeerServer,
    new_node_id,
)
from kvnode.agent.tiers.manager import TierManager
from kvnode.ipc.checksum import checksum as payload_checksum
from kvnode.ipc.segment import Segment

PAGE = 64 * 1024
ARENA = 16 * 1024 * 1024
CLIENT = 7  # the client id the tests commit entries as


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    """The fleet certificate, an authorized dir holding its public key, and a stranger
    (a certificate of its own, which no fleet member authorizes)."""
    keys = tmp_path / "keys"
    auth = tmp_path / "authorized"
    stranger_auth = tmp_path / "stranger-authorized"
    for d in (keys, auth, stranger_auth):
        d.mkdir()
    pub, sec = zmq.auth.create_certificates(keys, "fleet")
    spub, ssec = zmq.auth.create_certificates(keys, "stranger")
    (auth / "fleet.key").write_bytes(Path(pub).read_bytes())
    (stranger_auth / "stranger.key").write_bytes(Path(spub).read_bytes())
    # Public keys are public: the stranger knows the fleet's, so its links meet A's
    # server key and the refusal is A's ZAP handler's, not a failed handshake.
    (stranger_auth / "fleet.key").write_bytes(Path(pub).read_bytes())
    return {
        "secret": str(sec),
        "authorized": str(auth),
        "stranger_secret": str(ssec),
        "stranger_authorized": str(stranger_auth),
    }


class Node:
    """One agent's worth of peer machinery, driven by hand."""

    def __init__(self, curve: Curve | None, seeds: list[str] | None = None, serve: bool = True,
                 stores: dict[str, Any] | None = None, **manager_kw: Any) -> None:  # fmt: skip
        self.segment = Segment.create(
            f"/kvnode-peers-test-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            ARENA,
            prefault=False,
            hugepages=False,
        )
        self.index = Index(ARENA, PAGE, "lru")
        self.cache = Cache(self.index, self._tiers(stores) if stores else None)
        self.node_id = new_node_id()
        self.woken = threading.Event()
        tiers = self.cache.tiers
        self.server = (
            PeerServer(
                self.cache,
                self.segment,
                "tcp://127.0.0.1:*",
                curve,
                self.node_id,
                tiers.promoting_now if tiers is not None else None,
            )  # fmt: skip
            if serve
            else None
        )
        self.manager: PeerManager | None = None
        if seeds is not None:
            self.manager = PeerManager(
                self.cache, self.segment, curve, self.node_id, self.woken.set, seeds, **manager_kw
            )
        self.landed: list[Fetched] = []

    def _tiers(self, stores: dict[str, Any]) -> Callable[[Cache], TierManager]:
        cfg = load_config(env={}, overrides={})
        return lambda cache: TierManager(cfg, self.segment, cache, lambda: None, stores=stores)

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return self.server.endpoint

    def put(
        self, key: bytes, data: bytes, checksum: int | None = None, tokens: list[int] = ()
    ) -> None:
        status, e = self.cache.reserve(key, len(data), CLIENT)
        assert e is not None, status
        at = 0
        view = self.segment.view
        for off, n in e.extents(PAGE):
            view[off : off + n] = data[at : at + n]
            at += n
        csum = payload_checksum([data]) if checksum is None else checksum
        toks = [list(tokens)] if tokens else []
        assert int(self.cache.commit_many([key], CLIENT, [csum], [], toks)[0]) == 0

    def read(self, key: bytes) -> bytes | None:
        e = self.index.lookup(key)
        if e is None:
            return None
        return b"".join(bytes(self.segment.view[o : o + n]) for o, n in e.extents(PAGE))

    def step(self) -> None:
        """One turn of the agent loop: serve peers, finish fetches, release sends."""
        if self.server is not None:
            self.server.handle()
            self.server.poll()
        if self.manager is not None:
            self.landed.extend(self.manager.poll())
        if self.cache.tiers is not None:
            self.cache.tiers.poll()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.server is not None:
            self.server.close()
        if self.cache.tiers is not None:
            self.cache.tiers.close()
        self.index.check()
        self.segment.unlink()
        self.segment.close()


def pump(nodes: list[Node], until: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Run every node's loop until ``until()`` or the timeout; True when it held."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for n in nodes:
            n.step()
        if until():
            return True
        time.sleep(0.001)
    return False


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for n in reversed(made):
        n.close()


_PORTS_TAKEN: set[int] = set()  # handed out by this process: never twice


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range when it
    can be: a port picked there (bind to port 0) can be taken by the outgoing
    connection of an agent already started before the agent it was picked for binds
    it (a fleet test failed so: "Address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    rng = random.Random()
    for _ in range(200 if low > 11_000 else 0):
        port = rng.randrange(10_000, low)
        if port in _PORTS_TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_TAKEN.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleet_keys(d: Path) -> tuple[str, str]:
    """``kvnode keygen fleet`` in ``d``: (secret key path, authorized dir with its key)."""
    keys, auth = d / "keys", d / "authorized"
    subprocess.run([sys.executable, "-m", "kvnode", "keygen", "fleet", "--dir", str(keys)],
                   check=True)  # fmt: skip
    auth.mkdir()
    (auth / "fleet.key").write_bytes((keys / "fleet.key").read_bytes())
    return str(keys / "fleet.key_secret"), str(auth)
