"""Two (or three) nodes on 127.0.0.1 with real CURVE certificates: fetch byte-exact,
refuse an unknown key, reject a lying peer's bytes, bound what a frozen peer costs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from kvnode.agent import peers as P
from kvnode.agent.peers import Curve, resolve_seeds
from kvnode.agent.peers import wire as W
from kvnode.agent.tiers.memory import MemoryStore
from kvnode.errors import ProtocolError
from kvnode.ipc.checksum import checksum
from tests.peers.conftest import Node, pump

KiB = 1024
MiB = 1024 * KiB


def _key(i: int) -> bytes:
    return i.to_bytes(2, "big") * 8


def _data(i: int, size: int) -> bytes:
    return ((bytes([i % 251]) + os.urandom(15)) * (size // 16 + 1))[:size]


def _curve(fleet: dict[str, Any], who: str = "") -> Curve:
    prefix = f"{who}_" if who else ""
    return Curve.load(fleet[f"{prefix}secret"], fleet[f"{prefix}authorized"])


class _SlowRing:
    """A key ring whose first answer comes ``delay_s`` late."""

    def __init__(self, ring: Any, delay_s: float) -> None:
        self.ring, self.delay_s = ring, delay_s

    def callback(self, domain: str, key: bytes) -> bool:
        delay, self.delay_s = self.delay_s, 0
        time.sleep(delay)
        return bool(self.ring.callback(domain, key))


class RawPeer:
    """A CURVE peer that misbehaves on purpose. ``mode``: "frozen" (accepts, never
    reads), "wrong_size" (claims keys, sends short payloads), "mute_fetch" (answers
    lookups, never fetches), "flood" (answers a fetch with 150 frames more than asked).
    ``handshake_delay_s`` holds up its first CURVE handshake (a slow or busy peer)."""

    def __init__(self, curve: Curve, mode: str, size: int, handshake_delay_s: float = 0) -> None:
        self.ctx = zmq.Context()
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(W.ZAP_DOMAIN, _SlowRing(curve.ring, handshake_delay_s))
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.curve_secretkey, self.sock.curve_publickey = curve.secret, curve.public
        self.sock.curve_server = True
        self.sock.zap_domain = W.ZAP_DOMAIN.encode()
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.mode, self.size = mode, size
        self.node = W.new_node_id()
        self.requests = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        if mode != "frozen":
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not self.sock.poll(20):
                continue
            ident, body = self.sock.recv_multipart()
            self.requests += 1
            m = W.decode_request(body)
            n = len(m.keys)
            if isinstance(m, W.HaveReq):
                rep: Any = W.HaveRep(m.rid, self.node, [W.Have.ARENA] * n, [self.size] * n)
                self.sock.send_multipart([ident, W.encode(rep)])
            elif self.mode == "flood":  # far more than asked for, in one message
                frame = b"x" * self.size
                rep = W.FetchRep(m.rid, self.node, [self.size] * n, [0] * n, [1] * n)
                self.sock.send_multipart([ident, W.encode(rep), *([frame] * (n + 150))])
            elif self.mode == "wrong_size":
                short = b"x" * (self.size // 2)
                rep = W.FetchRep(m.rid, self.node, [self.size] * n,
                                 [checksum([short])] * n, [1] * n)  # fmt: skip
                self.sock.send_multipart([ident, W.encode(rep), *([short] * n)])

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._thread.join(2)
        self.sock.close(0)
        self.auth.stop()
        self.ctx.term()


@pytest.fixture
def raw_peers() -> Any:
    made: list[RawPeer] = []
    yield made
    for r in made:
        r.close()


def _wait_connected(
    node: Node, endpoints: list[str], others: list[Node] = (), timeout_s: float = 5.0
) -> None:
    """Ask until every endpoint has answered once (CURVE handshakes take a moment),
    running the loops of ``others`` (the peers' servers) meanwhile."""
    assert node.manager is not None
    probe = [_key(60000)]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        stats = node.manager.stats()["peers"]
        if all(stats.get(ep, {}).get("state") in ("up", "benched") for ep in endpoints):
            node.manager._negative.clear()
            return
        node.manager._negative.clear()
        node.manager.on_lookup_miss(probe)
        pump([node, *others], lambda: not node.manager.busy(), timeout_s=1.0)  # type: ignore[union-attr]
    raise AssertionError(f"peers never answered: {node.manager.stats()['peers']}")


def _wait_handshakes(
    node: Node, endpoints: list[str], others: list[Node] = (), timeout_s: float = 10.0
) -> None:
    """Run the loops until the CURVE handshake with every endpoint has completed, sending
    nothing (a peer that never answers is not asked, so it is not counted down)."""
    assert node.manager is not None
    ok = pump([node, *others], lambda: all(
        node.manager.stats()["peers"].get(ep, {}).get("state") == "up"  # type: ignore[union-attr]
        for ep in endpoints), timeout_s=timeout_s)  # fmt: skip
    assert ok, f"handshakes never completed: {node.manager.stats()['peers']}"


def test_committed_on_a_is_fetched_by_b_byte_exact(
    fleet: dict[str, Any], nodes: list[Node]
) -> None:
    a = Node(_curve(fleet))
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[a.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    sizes = [300 * KiB, 64 * KiB, 1000]  # several pages, one page, a partial page
    data = [_data(i, s) for i, s in enumerate(sizes)]
    keys = [_key(i + 1) for i in range(3)]
    for k, d in zip(keys, data):
        a.put(k, d)
    _wait_connected(b, [a.endpoint], [a])
    assert b.manager is not None
    missing = _key(99)
    assert b.manager.on_lookup_miss([*keys, missing], parent=_key(0)) == {*keys, missing}
    assert pump([a, b], lambda: len(b.landed) == 3)
    assert [f.key for f in b.landed] == keys
    assert [f.parent for f in b.landed] == [_key(0), keys[0], keys[1]]
    for k, d in zip(keys, data):
        assert b.read(k) == d
        assert b.index.entries[k].checksum == checksum([d])
    assert b.read(missing) is None and not b.manager.pending(missing)
    assert b.manager.on_lookup_miss([missing]) == set()  # nobody had it: not asked again
    peer = b.manager.stats()["peers"][a.endpoint]
    assert (
        peer["fetched_keys"] == 3 and peer["bytes"] == sum(map(len, data)) and peer["errors"] == 0
    )
    assert pump([a, b], lambda: a.index.pinned == 0)  # sends finished: pins released
    assert a.server is not None and a.server.stats()["served_keys"] == 3
    assert b.index.reserved == 0


def test_unknown_key_is_refused_and_counted(fleet: dict[str, Any], nodes: list[Node]) -> None:
    a = Node(_curve(fleet))
    nodes.append(a)
    a.put(_key(1), _data(1, 4 * KiB))
    stranger = Node(_curve(fleet, "stranger"), seeds=[a.endpoint], serve=False, deadline_ms=50)
    nodes.append(stranger)
    assert a.server is not None and stranger.manager is not None

    def refused() -> bool:
        stranger.manager._negative.clear()  # type: ignore[union-attr]
        stranger.manager.on_lookup_miss([_key(1)])  # type: ignore[union-attr]
        return a.server.stats()["refused"] >= 1  # type: ignore[union-attr]

    assert pump([a, stranger], refused)
    assert a.server.stats()["have_requests"] == 0  # nothing it sent got through
    assert stranger.read(_key(1)) is None
    # A plain client that knows the server key but not an authorized client key.
    ctx = zmq.Context()
    pub, sec = zmq.curve_keypair()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_publickey, s.curve_secretkey = pub, sec
    s.curve_serverkey = _curve(fleet).public
    s.connect(a.endpoint)
    s.send(W.encode(W.HaveReq(1, [_key(1)])))
    before = a.server.stats()["refused"]
    assert pump([a], lambda: a.server.stats()["refused"] > before)  # type: ignore[union-attr]
    assert s.poll(200) == 0 and a.server.stats()["have_requests"] == 0
    s.close(0)
    ctx.term()


def test_lying_peer_bytes_are_rejected_and_counted(
    fleet: dict[str, Any], nodes: list[Node]
) -> None:
    a = Node(_curve(fleet))
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[a.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    good = _data(3, 128 * KiB)
    a.put(_key(1), good)
    e = a.index.entries[_key(1)]
    off, _ = e.extents(a.index.page_bytes)[0]
    a.segment.view[off : off + 4] = b"\xde\xad\xbe\xef"  # A's copy went bad after commit
    _wait_connected(b, [a.endpoint], [a])
    assert b.manager is not None
    assert b.manager.on_lookup_miss([_key(1)]) == {_key(1)}
    assert pump([a, b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    assert b.landed == [] and b.read(_key(1)) is None and not b.index.contains(_key(1))
    peer = b.manager.stats()["peers"][a.endpoint]
    assert peer["corrupt"] == 1 and peer["fetched_keys"] == 0
    assert peer["state"] == "benched" and peer["benched"] == 1  # one bad chunk is enough
    assert b.manager.stats()["failed"] == 1
    assert b.manager.on_lookup_miss([_key(1)]) == set()  # not asked again at once


def test_wrong_sizes_are_rejected_and_the_peer_benched(
    fleet: dict[str, Any], nodes: list[Node], raw_peers: list[RawPeer]
) -> None:
    liar = RawPeer(_curve(fleet), "wrong_size", 64 * KiB)
    raw_peers.append(liar)
    b = Node(_curve(fleet), seeds=[liar.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    _wait_connected(b, [liar.endpoint])
    assert b.manager is not None
    peer = b.manager.stats()["peers"][liar.endpoint]
    if peer["benched"] == 0:  # the probe's fetch (short too) may still be on its way
        # Asked unless the probe's answer benched the peer in the meantime: either way the
        # bench must follow.
        assert b.manager.on_lookup_miss([_key(3)]) in ({_key(3)}, set())
        assert pump([b], lambda: b.manager.stats()["peers"][liar.endpoint]["benched"] > 0)  # type: ignore[union-attr]
    assert pump([b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    peer = b.manager.stats()["peers"][liar.endpoint]
    assert peer["corrupt"] >= 1 and peer["benched"] == 1 and peer["state"] == "benched"
    asked = liar.requests
    keys = [_key(1), _key(2)]
    assert b.manager.on_lookup_miss(keys) == set(keys)
    assert pump([b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    assert liar.requests == asked  # benched: not asked again
    assert b.landed == [] and all(not b.index.contains(k) for k in keys)
    assert b.index.reserved == 0 and b.manager.bytes_inflight == 0


def test_fetch_from_one_holder_without_asking_every_peer(
    fleet: dict[str, Any], nodes: list[Node], raw_peers: list[RawPeer]
) -> None:
    """A holder known in advance (a directory of peers' events) is asked directly: no
    lookup goes to the other peers, and the chain lands as from a lookup."""
    other = RawPeer(_curve(fleet), "wrong_size", 64 * KiB)  # would answer any lookup
    raw_peers.append(other)
    a = Node(_curve(fleet))
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[a.endpoint, other.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    datas = [_data(20 + i, 100 * KiB) for i in range(2)]
    keys = [_key(20), _key(21)]
    for k, d in zip(keys, datas):
        a.put(k, d)
    _wait_connected(b, [a.endpoint, other.endpoint], [a])
    assert b.manager is not None
    assert pump([a, b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    asked = other.requests
    got = b.manager.fetch_from(a.endpoint, keys, [len(d) for d in datas], parent=_key(19))
    assert got == set(keys)
    assert pump([a, b], lambda: len([f for f in b.landed if f.key in keys]) == 2)
    assert [b.read(k) for k in keys] == datas and other.requests == asked
    assert b.index.entries[keys[0]].meta is not None
    assert b.index.entries[keys[0]].meta.parent == _key(19)
    assert b.manager.stats()["direct_fetches"] == 1


def test_a_reply_larger_than_asked_benches_the_peer_and_cuts_its_link(
    fleet: dict[str, Any], nodes: list[Node], raw_peers: list[RawPeer]
) -> None:
    flood = RawPeer(_curve(fleet), "flood", 64 * KiB)
    raw_peers.append(flood)
    b = Node(_curve(fleet), seeds=[flood.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    _wait_connected(b, [flood.endpoint])
    assert b.manager is not None
    if b.manager.stats()["peers"][flood.endpoint]["oversized"] == 0:  # probe still on its way
        # Asked unless the probe's reply benched the peer meanwhile (a race with the
        # network thread): either way the oversized reply must be counted.
        assert b.manager.on_lookup_miss([_key(3)]) in ({_key(3)}, set())
        assert pump([b], lambda: b.manager.stats()["peers"][flood.endpoint]["oversized"] > 0)  # type: ignore[union-attr]
    assert pump([b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    peer = b.manager.stats()["peers"][flood.endpoint]
    assert peer["oversized"] == 1 and peer["state"] == "benched" and peer["fetched_keys"] == 0
    assert b.index.reserved == 0 and b.manager.bytes_inflight == 0 and not b.landed


def test_an_unverified_chunk_stays_unverified_on_the_other_node(
    fleet: dict[str, Any], nodes: list[Node]
) -> None:
    """Committed without a checksum on A: B gets it with none (never one A computed on
    the way), so a reader on B cannot take it for verified bytes."""
    a = Node(_curve(fleet))
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[a.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    data = _data(7, 100 * KiB)
    a.put(_key(1), data, checksum=0)
    _wait_connected(b, [a.endpoint], [a])
    assert b.manager is not None
    assert b.manager.on_lookup_miss([_key(1)]) == {_key(1)}
    assert pump([a, b], lambda: len(b.landed) == 1)
    assert b.read(_key(1)) == data and b.index.entries[_key(1)].checksum == 0


def test_fetched_chunks_keep_their_tokens_and_parent(
    fleet: dict[str, Any], nodes: list[Node]
) -> None:
    """What KV events on B need: the chunk's tokens come with its bytes."""
    a = Node(_curve(fleet))
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[a.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    tokens = list(range(100, 356))
    a.put(_key(1), _data(8, 64 * KiB), tokens=tokens)
    _wait_connected(b, [a.endpoint], [a])
    assert b.manager is not None
    assert b.manager.on_lookup_miss([_key(1)], parent=_key(0)) == {_key(1)}
    assert pump([a, b], lambda: len(b.landed) == 1)
    meta = b.index.entries[_key(1)].meta
    assert b.landed[0].tokens == tokens
    assert meta is not None and meta.token_ids() == tokens and meta.parent == _key(0)


def test_a_peers_question_starts_no_promotion(fleet: dict[str, Any], nodes: list[Node]) -> None:
    """A key on A's lower tier only: B's "do you have" is answered from what A knows,
    and A reads nothing from its disk for it."""
    disk = MemoryStore(64 * MiB, name="disk")
    a = Node(_curve(fleet), stores={"disk": disk})
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[a.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    data = _data(9, 64 * KiB)
    a.put(_key(1), data)
    assert a.cache.tiers is not None
    a.cache.evict(a.index.alloc.pages_total)
    assert pump([a], lambda: disk.size_of(_key(1)) is not None and not a.index.contains(_key(1)))
    reads = disk.stats.snapshot()["reads"]
    _wait_connected(b, [a.endpoint], [a])
    assert b.manager.on_lookup_miss([_key(1)]) == {_key(1)}  # type: ignore[union-attr]
    assert pump([a, b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    assert not a.cache.tiers.promoting and disk.stats.snapshot()["reads"] == reads
    assert not a.index.contains(_key(1)) and not b.index.contains(_key(1))


@pytest.mark.parametrize("handshake_delay_s", [0, 1.0])
def test_frozen_peer_costs_at_most_the_deadline(
    fleet: dict[str, Any], nodes: list[Node], raw_peers: list[RawPeer], handshake_delay_s: float
) -> None:
    deadline_s = 0.1
    frozen = RawPeer(_curve(fleet), "frozen", 0, handshake_delay_s)
    raw_peers.append(frozen)
    a = Node(_curve(fleet))
    nodes.append(a)
    b = Node(_curve(fleet), seeds=[frozen.endpoint, a.endpoint], serve=False,
             deadline_ms=int(deadline_s * 1000))  # fmt: skip
    nodes.append(b)
    data = _data(5, 256 * KiB)
    a.put(_key(1), data)
    # Both handshakes first: a frozen peer still handshaking is not asked at all (counted
    # unreachable), which is not the case under test.
    _wait_handshakes(b, [frozen.endpoint, a.endpoint], [a])
    assert b.manager is not None
    before = b.manager.stats()["peers"][frozen.endpoint]
    t0 = time.monotonic()
    assert b.manager.on_lookup_miss([_key(1)]) == {_key(1)}
    assert pump([a, b], lambda: len(b.landed) == 1)
    elapsed = time.monotonic() - t0
    assert b.read(_key(1)) == data
    assert elapsed < deadline_s + 0.5, elapsed  # the frozen peer held it up by the deadline
    after = b.manager.stats()["peers"][frozen.endpoint]
    assert after["lookups"] == before["lookups"] + 1  # the frozen peer was asked
    assert after["timeouts"] == before["timeouts"] + 1  # and cost its deadline, once
    # Alone, the frozen peer turns a lookup into a miss within the deadline, every time.
    t0 = time.monotonic()
    assert b.manager.on_lookup_miss([_key(2)]) == {_key(2)}
    assert pump([a, b], lambda: not b.manager.busy())  # type: ignore[union-attr]
    assert time.monotonic() - t0 < deadline_s + 0.5
    assert not b.index.contains(_key(2))


def test_claimed_sizes_evict_nothing_before_the_bytes_arrive(
    fleet: dict[str, Any], nodes: list[Node], raw_peers: list[RawPeer]
) -> None:
    """A peer that claims 8 MiB per key and never sends them: nothing local is evicted
    (or reserved) for bytes that have not arrived and been checked."""
    mute = RawPeer(_curve(fleet), "mute_fetch", 8 * MiB)
    raw_peers.append(mute)
    b = Node(_curve(fleet), seeds=[mute.endpoint], serve=False, deadline_ms=200,
             fetch_timeout_ms=300)  # fmt: skip
    nodes.append(b)
    local = [_key(1000 + i) for i in range(15)]
    for i, k in enumerate(local):
        b.put(k, _data(i, MiB))  # 15 of the arena's 16 MiB
    _wait_connected(b, [mute.endpoint])
    assert b.manager is not None
    keys = [_key(1), _key(2)]
    assert b.manager.on_lookup_miss(keys) == set(keys)
    assert pump([b], lambda: b.manager.pending(_key(1)) and b.manager.bytes_inflight > 0)  # type: ignore[union-attr]
    assert b.index.reserved == 0 and all(b.index.lookup(k) is not None for k in local)
    assert pump([b], lambda: not b.manager.busy(), timeout_s=3)  # type: ignore[union-attr]
    assert all(b.index.lookup(k) is not None for k in local)
    assert not any(b.index.contains(k) for k in keys) and b.index.reserved == 0
    assert b.manager.stats()["peers"][mute.endpoint]["timeouts"] >= 1


def test_a_peer_that_answers_but_never_sends_the_bytes_is_backed_off(
    fleet: dict[str, Any], nodes: list[Node], raw_peers: list[RawPeer]
) -> None:
    """A peer that answers "do you have" and never answers a fetch: after three
    fetches in a row time out it is skipped for a backoff, like a frozen peer. Each
    answer reset its failures, so every key was fetched from it, each at the cost of
    the fetch timeout."""
    mute = RawPeer(_curve(fleet), "mute_fetch", 64 * KiB)
    raw_peers.append(mute)
    b = Node(_curve(fleet), seeds=[mute.endpoint], serve=False, deadline_ms=200,
             fetch_timeout_ms=200)  # fmt: skip
    nodes.append(b)
    _wait_connected(b, [mute.endpoint])
    assert b.manager is not None
    for i in range(6):  # one key at a time, as lookups of new prompts come
        assert b.manager.on_lookup_miss([_key(50 + i)])
        assert pump([b], lambda: not b.manager.busy(), timeout_s=5)  # type: ignore[union-attr]
    peer = b.manager.stats()["peers"][mute.endpoint]
    assert peer["timeouts"] == 3 and peer["state"] == "down", peer
    assert not any(b.index.contains(_key(50 + i)) for i in range(6))


def test_a_seed_that_is_this_agent_is_recognised(fleet: dict[str, Any], nodes: list[Node]) -> None:
    a = Node(_curve(fleet))
    nodes.append(a)
    assert a.server is not None
    a.manager = P.PeerManager(a.cache, a.segment, _curve(fleet), a.node_id, a.woken.set,
                              [a.endpoint], deadline_ms=200)  # fmt: skip
    a.put(_key(1), _data(1, 4 * KiB))

    def is_self() -> bool:
        a.manager._negative.clear()  # type: ignore[union-attr]
        a.manager.on_lookup_miss([_key(2)])  # type: ignore[union-attr]
        peer = a.manager.stats()["peers"].get(a.endpoint, {})  # type: ignore[union-attr]
        return bool(peer.get("state") == "self")

    assert pump([a], is_self)


def test_insecure_mode_round_trip(nodes: list[Node]) -> None:
    a = Node(None)
    nodes.append(a)
    b = Node(None, seeds=[a.endpoint], serve=False, deadline_ms=200)
    nodes.append(b)
    a.put(_key(1), _data(1, 70 * KiB))
    _wait_connected(b, [a.endpoint], [a])
    assert b.manager is not None and b.manager.on_lookup_miss([_key(1)]) == {_key(1)}
    assert pump([a, b], lambda: len(b.landed) == 1)
    assert b.read(_key(1)) == a.read(_key(1))


def test_bad_frames_get_an_error_and_the_server_goes_on(nodes: list[Node]) -> None:
    a = Node(None)
    nodes.append(a)
    with pytest.raises(ProtocolError):
        W.decode_request(b"\x01\xc1garbage")
    with pytest.raises(ProtocolError):
        W.decode_request(W.encode(W.HaveReq(1, [b"short"])))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(a.endpoint)
    s.send(b"\x01\xff\xff")
    s.send_multipart([b"two", b"frames"])
    s.send(W.encode(W.HaveReq(7, [_key(1)])))
    got: list[Any] = []
    assert pump(
        [a], lambda: bool(s.poll(0)) and got.append(s.recv_multipart()) is None and len(got) >= 2
    )
    assert isinstance(W.decode_reply(got[0][0]), W.ErrorRep)
    rep = W.decode_reply(got[1][0])
    assert isinstance(rep, W.HaveRep) and rep.rid == 7 and rep.states == [W.Have.ABSENT]
    assert a.server is not None and a.server.stats()["bad_frames"] == 2
    s.close(0)
    ctx.term()


def test_seeds_resolve_dns_names() -> None:
    got = resolve_seeds(["tcp://10.0.0.5:7470", "dns:localhost:7470", "dns:no-such-name.invalid:1"])
    assert "tcp://10.0.0.5:7470" in got
    assert "tcp://127.0.0.1:7470" in got or "tcp://[::1]:7470" in got
    assert not any("no-such-name" in g for g in got)


def test_key_rotation_without_a_gap(
    fleet: dict[str, Any], tmp_path: Any, nodes: list[Node]
) -> None:
    """A runs the old fleet key, B already the new one. Until both authorized dirs
    list both keys they cannot talk; after a reload they do, with no restart."""
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    pub2, sec2 = zmq.auth.create_certificates(new_dir, "fleet2")
    b_auth = tmp_path / "b-authorized"
    b_auth.mkdir()
    (b_auth / "fleet2.key").write_bytes(Path(pub2).read_bytes())
    a = Node(_curve(fleet))
    nodes.append(a)
    a.put(_key(1), _data(1, 8 * KiB))
    b = Node(Curve.load(sec2, str(b_auth)), seeds=[a.endpoint], serve=False, deadline_ms=50)
    nodes.append(b)
    assert b.manager is not None and a.server is not None
    b.manager.on_lookup_miss([_key(1)])
    assert not pump([a, b], lambda: len(b.landed) == 1, timeout_s=0.5)
    # Step 1 of a rotation: both keys authorized everywhere, then reload.
    (b_auth / "fleet.key").write_bytes((Path(fleet["authorized"]) / "fleet.key").read_bytes())
    (Path(fleet["authorized"]) / "fleet2.key").write_bytes(Path(pub2).read_bytes())
    assert a.server.curve is not None and a.server.curve.ring.reload() == 2
    assert b.manager.reload_keys() == 2

    def fetched() -> bool:
        b.manager._negative.clear()  # type: ignore[union-attr]
        b.manager.on_lookup_miss([_key(1)])  # type: ignore[union-attr]
        return len(b.landed) == 1

    assert pump([a, b], fetched)
    assert b.read(_key(1)) == a.read(_key(1))


def test_replies_a_slow_reader_has_no_room_for_are_counted_dropped_not_served(
    nodes: list[Node],
) -> None:
    """A peer sends 300 fetches of a 1 MiB chunk and reads slowly: the server's queue
    to it fills. What it cannot queue is counted ``dropped`` and its pins go at once;
    ``served_keys`` counts only the replies that left, which the reader then gets.
    libzmq dropped them silently, after they had been counted served."""
    a = Node(None)
    nodes.append(a)
    data = _data(7, MiB)
    a.put(_key(1), data)
    assert a.server is not None
    ctx = zmq.Context()
    reader = ctx.socket(zmq.DEALER)
    reader.setsockopt(zmq.RCVHWM, 1)
    reader.setsockopt(zmq.RCVBUF, 4096)
    reader.setsockopt(zmq.LINGER, 0)
    reader.connect(a.endpoint)
    try:
        time.sleep(0.3)
        asks = 300
        for i in range(asks):
            reader.send(W.encode(W.FetchReq(i + 1, [_key(1)])))
        pump([a], lambda: a.server.counters["fetch_requests"] == asks)  # type: ignore[union-attr]
        assert a.server.counters["fetch_requests"] == asks
        got = 0
        end = time.monotonic() + 10
        while time.monotonic() < end:
            a.step()
            if reader.poll(200):
                rep = W.decode_reply(reader.recv_multipart()[0])
                got += isinstance(rep, W.FetchRep) and rep.sizes == [len(data)]
            elif not a.server.busy():
                break
        c = a.server.counters
        assert c["dropped"] > 0, c
        assert c["served_keys"] == got, (c, got)
        assert pump([a], lambda: not a.server.busy())  # type: ignore[union-attr]
        assert a.server.bytes_inflight == 0 and a.index.pinned == 0
    finally:
        reader.close(0)
        ctx.term()
