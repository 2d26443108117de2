"""The cluster directory: routing logic (unit), then real sockets: a peer's event stream
followed over CURVE, a holder that evicted what it announced, a stream cut and resynced,
and real agent processes (no lookup fan-out, a restarted peer re-announced)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvnode.agent.events import MEDIUM_CPU, MEDIUM_STORAGE, EventPublisher
from kvnode.agent.peers import Curve
from kvnode.agent.peers.directory import ARENA, STORAGE, Directory
from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient, Lookup, Status
from tests.conftest import AgentProcess
from tests.peers.conftest import Node, fleet_keys, free_port, pump

A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"
K = [bytes([i]) * 16 for i in range(8)]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _synced(d: Directory, *eps: str) -> None:
    for ep in eps:
        d.add_peer(ep)
        d.set_synced(ep, True)


# -- routing ---------------------------------------------------------------------------
def test_route_picks_one_holder_of_the_longest_run_in_memory_first() -> None:
    d = Directory()
    _synced(d, A, B, C)
    d.stored(A, K[:2], STORAGE)
    d.stored(B, K[:3], STORAGE)
    d.stored(C, K[:3], ARENA)
    r = d.route(K[:5])
    assert r.ask == [C] and r.n == 3 and not r.fallback  # B ties on length, C has it in memory
    d.removed(C, [K[2]], ARENA)
    r = d.route(K[:5])
    assert r.ask == [B] and r.n == 3
    assert d.holders(K[0]) == {A: STORAGE, B: STORAGE, C: ARENA}


def test_route_reads_each_peers_load_once() -> None:
    """The load (requests outstanding to a peer) changes on the network thread while
    the loop routes: a holder whose load grew between two reads left no peer at the
    least, and the lookup was answered with an internal error."""
    d = Directory()
    _synced(d, A, B)
    d.stored(A, K[:1], ARENA)
    d.stored(B, K[:1], ARENA)
    reads: dict[str, int] = {}

    def load(ep: str) -> int:  # each read of a peer finds one more request outstanding
        reads[ep] = reads.get(ep, 0) + 1
        return reads[ep] + (0 if ep == A else 5)

    r = d.route(K[:1], load)
    assert r.ask == [A] and r.n == 1
    assert reads == {A: 1, B: 1}


def test_nobody_holds_it_and_every_stream_synced_is_a_miss_without_asking() -> None:
    d = Directory()
    _synced(d, A, B)
    assert d.route(K[:2]).ask == [] and d.counters["no_holder"] == 1


def test_a_restarted_peer_is_forgotten_and_forget_drops_a_stale_holder() -> None:
    d = Directory()
    _synced(d, A, B)
    d.stored(A, K[:3], ARENA)
    d.stored(B, K[:1], ARENA)
    d.reset(A)  # AllBlocksCleared, or a new generation
    assert d.holders(K[1]) == {} and d.holders(K[0]) == {B: ARENA} and len(d) == 1
    d.forget(B, [K[0]])
    assert len(d) == 0 and d.counters["forgotten"] == 1


def test_fallback_asks_unsynced_peers_within_its_rate() -> None:
    clock = Clock()
    d = Directory(fallback_per_s=1.0, clock=clock)
    _synced(d, A)
    d.add_peer(B)  # B's stream resyncs
    r = d.route(K[:2])
    assert r.ask == [B] and r.fallback and r.n == 2
    assert d.route(K[:2]).ask == []  # the budget is spent: a miss, counted
    assert d.counters["fallback_limited"] == 1
    clock.t += 1.0
    assert d.route(K[:2]).ask == [B]
    d.set_synced(B, True)
    assert d.route(K[:2]).ask == [] and d.counters["no_holder"] == 1


def test_entries_are_bounded_and_the_overflowing_peer_is_no_longer_trusted() -> None:
    d = Directory(entries_max=2)
    _synced(d, A)
    d.stored(A, K[:3], ARENA)
    assert len(d) == 2 and d.counters["entries_dropped"] == 1 and not d.synced(A)


def test_peers_beyond_the_bound_are_refused() -> None:
    d = Directory(peers_max=1)
    assert d.add_peer(A) is not None and d.add_peer(B) is None
    assert d.counters["peers_refused"] == 1


# -- real sockets, the loop played by the test ----------------------------------------
class Proxy(threading.Thread):
    """A TCP forwarder that can be cut (every connection closed, new ones refused)
    and restored: a network partition between a subscriber and a stream."""

    def __init__(self, target: int) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.05)
        self.port = self.lsock.getsockname()[1]
        self.cut = False
        self.stop = False
        self.conns: list[socket.socket] = []
        self.start()

    def run(self) -> None:
        while not self.stop:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                continue
            if self.cut:
                a.close()
                continue
            b = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        for s in (x, y):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def sever(self) -> None:
        self.cut = True
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def close(self) -> None:
        self.stop = True
        self.sever()
        self.lsock.close()


@pytest.fixture
def curve(fleet: dict[str, Any]) -> Curve:
    return Curve.load(fleet["secret"], fleet["authorized"])


def _publisher(curve: Curve) -> EventPublisher:
    return EventPublisher(f"tcp://*:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}",
                          curve=curve)  # fmt: skip


def _holder(
    nodes: list[Node], curve: Curve, events_ports: tuple[int, int] | None = None
) -> tuple[Node, EventPublisher]:
    pub = _publisher(curve)
    a = Node(curve)
    assert a.server is not None
    a.server.events_ports = events_ports or pub.tcp_ports()
    nodes.append(a)
    return a, pub


def _follower(
    nodes: list[Node], curve: Curve, seeds: list[str], clock: Any = time.monotonic
) -> Node:
    d = Directory(fallback_per_s=1.0, clock=clock)
    b = Node(curve, seeds=seeds, serve=False, directory=d, deadline_ms=500)
    nodes.append(b)
    return b


def _announce(
    a: Node, pub: EventPublisher, key: bytes, data: bytes, medium: str = MEDIUM_CPU
) -> None:
    if medium == MEDIUM_CPU:
        a.put(key, data)
    pub.stored(key, None, [1, 2], medium)
    pub.flush()


def _dir(b: Node) -> Directory:
    assert b.manager is not None and b.manager.directory is not None
    return b.manager.directory


def test_a_holder_that_evicted_what_it_announced_ends_in_a_clean_miss(
    nodes: list[Node], curve: Curve
) -> None:
    a, pub = _holder(nodes, curve)
    try:
        b = _follower(nodes, curve, [a.endpoint])
        d = _dir(b)
        assert pump(nodes, lambda: d.synced(a.endpoint)), b.manager.stats()  # type: ignore[union-attr]
        data = os.urandom(100_000)
        _announce(a, pub, K[0], data)
        _announce(a, pub, K[1], os.urandom(1000))
        assert pump(nodes, lambda: len(d) == 2)
        a.index.drop(K[1])  # evicted; its BlockRemoved never sent (or not arrived yet)
        m = b.manager
        assert m is not None
        assert m.on_lookup_miss([K[0]]) == {K[0]}
        assert pump(nodes, lambda: b.read(K[0]) == data)
        assert m.on_lookup_miss([K[1]]) == {K[1]}  # the directory still names a
        assert pump(nodes, lambda: not m.pending(K[1]))
        assert b.read(K[1]) is None and K[1] not in b.index.entries  # a miss, nothing stuck
        assert d.holders(K[1]) == {} and d.counters["forgotten"] == 1
        assert m.on_lookup_miss([K[1]]) == set()  # not asked again
        st = a.server.stats()  # type: ignore[union-attr]
        assert st["have_requests"] == 2
    finally:
        pub.close()


def test_a_cut_stream_falls_back_to_asking_within_its_bound_until_it_resyncs(
    nodes: list[Node], curve: Curve
) -> None:
    pub = _publisher(curve)
    pp, rp = pub.tcp_ports()
    pub_proxy, rep_proxy = Proxy(pp), Proxy(rp)
    clock = Clock()
    try:
        a, _ = _holder(nodes, curve, (pub_proxy.port, rep_proxy.port))
        a_pub = pub
        b = _follower(nodes, curve, [a.endpoint], clock)
        d = _dir(b)
        m = b.manager
        assert m is not None
        assert pump(nodes, lambda: d.synced(a.endpoint))
        _announce(a, a_pub, K[0], os.urandom(5000))
        assert pump(nodes, lambda: len(d) == 1)
        asked = a.server.stats()["have_requests"]  # type: ignore[union-attr]
        assert m.on_lookup_miss([K[5]]) == set()  # synced, nobody has it: no message
        pub_proxy.sever()
        rep_proxy.sever()
        assert pump(nodes, lambda: not d.synced(a.endpoint)), m.stats()
        # While it resyncs, holders it announced since are unknown: a miss asks it,
        # once per token of the fallback budget (1/s on the test's clock).
        data = os.urandom(7000)
        _announce(a, a_pub, K[1], data)
        assert m.on_lookup_miss([K[1]]) == {K[1]}
        assert pump(nodes, lambda: b.read(K[1]) == data)
        assert m.on_lookup_miss([K[6]]) == set() and m.on_lookup_miss([K[7]]) == set()
        assert d.counters["fallback"] == 1 and d.counters["fallback_limited"] == 2
        assert a.server.stats()["have_requests"] == asked + 1  # type: ignore[union-attr]
        pub_proxy.cut = rep_proxy.cut = False  # the network is back
        assert pump(nodes, lambda: d.synced(a.endpoint), timeout_s=15), m.stats()
        assert d.holders(K[1]) == {a.endpoint: ARENA}  # replayed from where it stopped
        clock.t += 10
        assert m.on_lookup_miss([K[7]]) == set()  # synced again: no fallback
        assert d.counters["fallback"] == 1
    finally:
        pub_proxy.close()
        rep_proxy.close()
        pub.close()


def test_a_peer_whose_announcements_found_no_room_is_replayed_once_there_is_room(
    nodes: list[Node], curve: Curve
) -> None:
    """A directory of two entries: the holder's third chunk finds no room, so the
    holder is no longer trusted as synced. Once one of its chunks is gone there is
    room: its stream replays its whole state (a snapshot), the third chunk is learned
    and the holder is synced again. It stayed unsynced for good, and the chunk was
    found only through the fallback's rate."""
    a, pub = _holder(nodes, curve)
    try:
        d = Directory(entries_max=2, fallback_per_s=1.0)
        b = Node(curve, seeds=[a.endpoint], serve=False, directory=d, deadline_ms=500)
        nodes.append(b)
        assert pump(nodes, lambda: d.synced(a.endpoint)), b.manager.stats()  # type: ignore[union-attr]
        for k in K[:3]:
            _announce(a, pub, k, os.urandom(1000))
        assert pump(nodes, lambda: d.counters["entries_dropped"] == 1)
        assert not d.synced(a.endpoint) and d.holders(K[2]) == {}
        a.index.drop(K[0])
        pub.removed(K[0])
        pub.flush()
        assert pump(
            nodes,
            lambda: d.synced(a.endpoint) and d.holders(K[2]) == {a.endpoint: ARENA},
            timeout_s=15,
        ), (d.stats(), b.manager.stats())  # type: ignore[union-attr]
        assert d.holders(K[0]) == {} and d.holders(K[1]) == {a.endpoint: ARENA}
        assert d.counters["resyncs_asked"] == 1
    finally:
        pub.close()


def test_storage_announcements_and_history_beyond_the_ring_come_as_a_snapshot(
    nodes: list[Node], curve: Curve
) -> None:
    pub = EventPublisher(f"tcp://*:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}",
                         curve=curve, replay_batches_max=2)  # fmt: skip
    try:
        a, _ = _holder(nodes, curve, pub.tcp_ports())
        for i in range(6):  # six batches: the ring keeps the last two
            _announce(a, pub, K[i], os.urandom(100), MEDIUM_STORAGE if i % 2 else MEDIUM_CPU)
        pub.removed(K[0], MEDIUM_CPU)
        pub.flush()
        b = _follower(nodes, curve, [a.endpoint])
        d = _dir(b)
        assert pump(nodes, lambda: d.synced(a.endpoint))
        assert pub.stats()["replay_snapshots"] == 1
        assert d.holders(K[0]) == {}
        assert d.holders(K[1]) == {a.endpoint: STORAGE} and d.holders(K[2]) == {a.endpoint: ARENA}
        assert len(d) == 5
    finally:
        pub.close()


# -- real agents -----------------------------------------------------------------------
def _fleet(tmp_path: Path, names: str) -> dict[str, AgentProcess]:
    secret, auth = fleet_keys(tmp_path)
    ports = {n: (free_port(), free_port(), free_port()) for n in names}
    out = {}
    for n in names:
        listen, ev, rep = ports[n]
        seeds = ",".join(f"tcp://127.0.0.1:{ports[m][0]}" for m in names if m != n)
        out[n] = AgentProcess(tmp_path / n, args=[
            "--set", f"peers.curve_secret_key={secret}",
            "--set", f"peers.curve_authorized_dir={auth}",
            "--set", f"peers.listen=tcp://127.0.0.1:{listen}",
            "--set", f"peers.seeds={seeds}",
            "--set", f"events.endpoint=tcp://*:{ev}",
            "--set", f"events.replay_endpoint=tcp://127.0.0.1:{rep}",
            "--set", "peers.deadline_ms=500",
            "--set", "arena.prefault=false",
        ])  # fmt: skip
    return out


def _put(c: AgentClient, keys: list[bytes]) -> list[bytes]:
    datas = []
    for i, k in enumerate(keys):
        d = os.urandom(50_000 + i)
        ((st, slot),) = c.reserve([k], [len(d)])
        assert st == Status.OK and slot is not None
        c.write(slot, d)
        assert c.commit([k], [checksum(d)], [keys[i - 1] if i else b""], [[i, 7]]) == [Status.OK]
        datas.append(d)
    return datas


def _until(cond: Any, what: Any, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, what() if callable(what) else what
        time.sleep(0.05)


def _directory(c: AgentClient) -> dict[str, Any]:
    return c.stats()["peers"].get("directory", {})  # type: ignore[no-any-return]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[dict[str, AgentProcess]]:
    fleet = _fleet(tmp_path, "abc")
    try:
        for a in fleet.values():
            a.start()
        yield fleet
    finally:
        for a in fleet.values():
            a.stop()


def test_agents_route_a_miss_to_one_holder_and_re_announce_after_a_restart(
    agents: dict[str, AgentProcess],
) -> None:
    ca, cb, cc = (AgentClient(agents[n].runtime_dir, name=n, timeout_s=5.0) for n in "abc")
    try:
        _until(lambda: _directory(cb).get("peers_synced") == 2, lambda: _directory(cb))
        keys = [os.urandom(16) for _ in range(3)]
        datas = _put(ca, keys)
        _until(lambda: _directory(cb).get("entries", 0) >= 3, lambda: _directory(cb))
        have_c = cc.stats()["peers_server"]["have_requests"]
        assert Lookup.PENDING in cb.lookup(keys)
        _until(lambda: cb.lookup(keys) == [Lookup.HIT] * 3, lambda: cb.stats()["peers"])
        assert [cb.get(k) for k in keys] == datas
        # Nobody has it, every stream synced: a miss at once, no message to any peer.
        have_a = ca.stats()["peers_server"]["have_requests"]
        assert cb.lookup([os.urandom(16)]) == [Lookup.MISS]
        assert ca.stats()["peers_server"]["have_requests"] == have_a
        assert cc.stats()["peers_server"]["have_requests"] == have_c  # c was never asked
        # a restarts: what it announced is forgotten, what it holds now is re-announced.
        ca.close()
        agents["a"].stop()
        agents["a"].start()
        ca = AgentClient(agents["a"].runtime_dir, name="a2", timeout_s=5.0)
        fresh = [os.urandom(16)]
        data = _put(ca, fresh)
        _until(lambda: _directory(cb).get("restarts", 0) >= 1 and _directory(cb).get("peers_synced") == 2,
               lambda: _directory(cb))  # fmt: skip
        _until(lambda: cc.stats()["peers"]["directory"]["entries"] >= 1, "c follows a too")
        _until(lambda: cb.lookup(fresh) == [Lookup.HIT], lambda: cb.stats()["peers"])
        assert cb.get(fresh[0]) == data[0]
    finally:
        for c in (ca, cb, cc):
            c.close()


# -- fetched copies ----------------------------------------------------------------------
def test_a_fetched_copy_is_borrowed_then_returned_and_kept_when_fetched_again() -> None:
    from kvnode.agent.peers.replicas import Replicas

    clock = Clock()
    r = Replicas("second", borrow_s=5.0, ghosts_max=2, clock=clock)
    r.landed(K[0])
    assert r.due() == [] and len(r) == 1
    clock.t += 5.0
    assert r.due() == [K[0]]  # the manager drops it unless a reader holds it
    r.landed(K[0])  # fetched again while remembered: kept
    assert r.counters == {"borrowed": 1, "kept": 1, "returned": 0} and len(r) == 0
    for k in K[1:4]:  # the memory of fetched keys is bounded
        r.landed(k)
    r.landed(K[1])  # forgotten already: borrowed again
    assert r.counters["borrowed"] == 5 and r.counters["kept"] == 1
    always = Replicas("always")
    always.landed(K[0])
    assert len(always) == 0


def test_a_borrowed_copy_is_dropped_after_its_time_unless_pinned(
    nodes: list[Node], curve: Curve
) -> None:
    from kvnode.agent.peers.replicas import Replicas
    from tests.peers.test_peers import _wait_connected

    clock = Clock()
    a = Node(curve)
    nodes.append(a)
    b = Node(curve, seeds=[a.endpoint], serve=False, deadline_ms=500,
             replicas=Replicas("second", borrow_s=1.0, clock=clock))  # fmt: skip
    nodes.append(b)
    m = b.manager
    assert m is not None
    data = [os.urandom(9000), os.urandom(9000)]
    a.put(K[0], data[0])
    a.put(K[1], data[1])
    _wait_connected(b, [a.endpoint], [a])
    assert m.on_lookup_miss(K[:2]) == set(K[:2])
    assert pump(nodes, lambda: b.read(K[1]) == data[1])
    assert b.index.pin(K[0]) is not None  # a reader holds K[0]
    clock.t += 1.0
    b.step()
    assert K[1] not in b.index.entries or b.index.entries[K[1]].state.name != "COMMITTED"
    assert b.read(K[0]) == data[0]  # still read: looked at again later
    b.index.unpin(K[0])
    clock.t += 1.0
    b.step()
    assert b.read(K[0]) is None
    assert m.stats()["replicas"]["returned"] == 2
