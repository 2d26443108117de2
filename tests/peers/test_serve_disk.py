"""A peer asks for a chunk that lies only on this node's disk: it is read from the disk
tier (a real DiskStore on real files) and sent with its writer's checksum, byte for
byte, without passing through (or evicting anything from) this node's arena."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvnode.agent.peers import Curve
from kvnode.agent.peers.lower import LowerReads
from kvnode.agent.tiers.base import SlotBuffers
from kvnode.agent.tiers.disk import DiskStore
from kvnode.ipc.checksum import checksum
from tests.peers.conftest import Node, pump
from tests.peers.test_peers import _wait_connected

KEY = b"\x07" * 16
OTHER = b"\x08" * 16


def _disk_server_and_fetcher(curve: Curve, store: DiskStore, nodes: list[Node]) -> Any:
    """Node a serves peers from its arena and from ``store``; node b fetches from a."""
    a = Node(curve)
    assert a.server is not None
    a.server.disk = LowerReads(store, a.woken.set)
    a.server.disk.start()
    nodes.append(a)
    b = Node(curve, seeds=[a.endpoint], serve=False, deadline_ms=500)
    nodes.append(b)
    assert b.manager is not None
    return a, b, b.manager


def test_a_disk_only_key_is_fetched_by_a_peer_byte_exact(
    tmp_path: Path, fleet: dict[str, str], nodes: list[Node]
) -> None:
    curve = Curve.load(fleet["secret"], fleet["authorized"])
    store = DiskStore(str(tmp_path / "disk"), 64 << 20)
    data = os.urandom(300_000)
    writer_csum = checksum([memoryview(data)])
    assert store.put(KEY, SlotBuffers.of(bytearray(data)), writer_csum)
    a, b, m = _disk_server_and_fetcher(curve, store, nodes)
    resident = os.urandom(5000)
    a.put(OTHER, resident)  # in a's arena: served from there, in the same reply
    _wait_connected(b, [a.endpoint], [a])
    assert m.on_lookup_miss([OTHER, KEY]) == {OTHER, KEY}
    assert pump(nodes, lambda: b.read(KEY) is not None), (m.stats(), a.server.stats())
    assert b.read(KEY) == data and b.read(OTHER) == resident
    assert b.index.entries[KEY].checksum == writer_csum  # the writer's, unchanged
    assert KEY not in a.index.entries  # never promoted into a's arena for the peer
    st = a.server.stats()
    assert st["served_from_disk"] == 1 and st["disk_read_bytes"] == len(data)
    assert pump(nodes, lambda: a.server.stats()["bytes_inflight"] == 0)  # type: ignore[union-attr]


def test_a_disk_read_that_fails_is_a_miss_for_the_peer(
    tmp_path: Path, fleet: dict[str, str], nodes: list[Node]
) -> None:
    curve = Curve.load(fleet["secret"], fleet["authorized"])
    store = DiskStore(str(tmp_path / "disk"), 64 << 20)
    data = os.urandom(100_000)
    assert store.put(KEY, SlotBuffers.of(bytearray(data)), checksum([memoryview(data)]))
    path = Path(store.path_of(KEY))
    a, b, m = _disk_server_and_fetcher(curve, store, nodes)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the file rots after the disk index was built
    path.write_bytes(bytes(raw))
    _wait_connected(b, [a.endpoint], [a])
    assert m.on_lookup_miss([KEY]) == {KEY}
    assert pump(nodes, lambda: not m.pending(KEY))
    assert KEY not in b.index.entries  # nothing committed, nothing left reserved
    assert a.server.stats()["disk_read_failed"] == 1
    assert pump(nodes, lambda: a.server.stats()["bytes_inflight"] == 0)  # type: ignore[union-attr]
