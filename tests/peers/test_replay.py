"""The KV-event replay socket as a hostile or careless requester meets it: requesters
that ask and never read, too many of them, too often, unknown CURVE keys, and a real
agent that must keep answering lookups (and stop on SIGTERM) while they sit there."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from kvnode.agent.config import load_config
from kvnode.agent.events import EventPublisher
from kvnode.agent.peers import Curve
from kvnode.agent.replay import END_SEQ, ReplayLimits, ReplayRing
from kvnode.errors import ConfigError
from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient, Status
from tests.conftest import AgentProcess
from tests.peers.conftest import free_port

PAYLOAD_TOKENS = 2048  # a fat event: about 4-6 KiB of msgpack


def _fill(pub: EventPublisher, batches: int, events_each: int = 1) -> None:
    for b in range(batches):
        for i in range(events_each):
            pub.stored((b * events_each + i).to_bytes(16, "big"), None, range(PAYLOAD_TOKENS))
        pub.flush()


def _requester(ctx: zmq.Context, endpoint: str, reads: bool = True, **keys: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if not reads:
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.RCVBUF, 4096)
    for name, value in keys.items():
        setattr(s, name, value)
    s.connect(endpoint)
    return s


def _ask(s: zmq.Socket, start: int = 0) -> None:
    s.send_multipart([b"", start.to_bytes(8, "big")])


def _read_replay(s: zmq.Socket, timeout_ms: int = 5000) -> list[int] | None:
    """Sequence numbers of one whole replay; None when nothing came."""
    seqs: list[int] = []
    while s.poll(timeout_ms):
        frames = s.recv_multipart()
        if frames[2] == END_SEQ:
            return seqs
        seqs.append(int.from_bytes(frames[2], "big"))
    return seqs or None


def _until(cond: Any, what: str, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.01)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(0)


def test_ring_is_bounded_in_batches_and_bytes() -> None:
    ring = ReplayRing(batches_max=100, bytes_max=1000)
    for seq in range(20):
        ring.append(seq, bytes(100))
    assert len(ring) == 10 and ring.nbytes == 1000 and ring.evicted == 10
    assert ring.get(0) == (10, bytes(100))  # older than kept: the oldest kept
    assert ring.get(19) == (19, bytes(100)) and ring.get(20) is None and ring.end() == 20


def test_requester_that_never_reads_holds_at_most_its_byte_bound(ctx: zmq.Context) -> None:
    limits = ReplayLimits(requester_bytes_max=256 << 10, requester_bytes_per_s=1 << 30,
                          stall_s=0.5)  # fmt: skip
    pub = EventPublisher("inproc://ev-never-reads", replay_endpoint="tcp://127.0.0.1:*",
                         replay_limits=limits)  # fmt: skip
    try:
        _fill(pub, 1000, events_each=16)  # about 90 MiB: more than socket buffers hold
        batch = pub.ring.nbytes // len(pub.ring)
        mute = _requester(ctx, pub.replay_endpoint, reads=False)
        _ask(mute)
        _until(lambda: pub.stats()["replay_stalled"] == 1, "a replay nobody reads is abandoned")
        st = pub.stats()
        # Bounded by its budget (plus the one batch that crossed it), not the ring's 1000.
        assert st["replay_batches"] < 1000
        assert st["replay_queued_bytes"] <= limits.requester_bytes_max + batch
        # An honest requester meanwhile gets the whole ring.
        honest = _requester(ctx, pub.replay_endpoint)
        _ask(honest)
        assert _read_replay(honest) == list(range(1000))
        mute.close(0)  # its queued bytes go with its connection, and so does its slot
        _until(lambda: pub.stats()["replay_queued_bytes"] == 0, "queued bytes released")
        _until(lambda: pub.stats()["replay_requesters"] == 0, "idle requesters forgotten")
    finally:
        pub.close()


def test_requesters_and_requests_are_bounded_and_refusals_counted(ctx: zmq.Context) -> None:
    limits = ReplayLimits(requesters_max=2, requests_per_s=0.01)  # a burst of one
    pub = EventPublisher("inproc://ev-bounds", replay_endpoint="tcp://127.0.0.1:*",
                         replay_limits=limits)  # fmt: skip
    try:
        _fill(pub, 3)
        a, b, c = (_requester(ctx, pub.replay_endpoint) for _ in range(3))
        for s in (a, b):
            _ask(s)
            assert _read_replay(s) == [0, 1, 2]
        _ask(c)  # a third requester while two hold budgets not yet refilled
        assert _read_replay(c, timeout_ms=300) is None
        _ask(a)  # a's request budget (a burst of one, 100 s to refill) is spent
        assert _read_replay(a, timeout_ms=300) is None
        st = pub.stats()
        assert st["replay_refused"] == 1 and st["replay_rate_limited"] == 1
        a.send_multipart([b"", b"short"])  # malformed: counted, not answered
        _until(lambda: pub.stats()["bad_replays"] == 1, "malformed request counted")
    finally:
        pub.close()


def test_replay_on_tcp_admits_only_the_fleets_keys(tmp_path: Path, ctx: zmq.Context) -> None:
    keys, auth = tmp_path / "keys", tmp_path / "authorized"
    keys.mkdir()
    auth.mkdir()
    pub_f, sec_f = zmq.auth.create_certificates(keys, "fleet")
    _, stranger_f = zmq.auth.create_certificates(keys, "stranger")
    (auth / "fleet.key").write_bytes(Path(pub_f).read_bytes())
    curve = Curve.load(sec_f, str(auth))
    pub = EventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", curve=curve)
    try:
        _fill(pub, 2)
        fp, fs = zmq.auth.load_certificate(sec_f)
        sp, ss = zmq.auth.load_certificate(stranger_f)
        member = _requester(ctx, pub.replay_endpoint, curve_publickey=fp, curve_secretkey=fs,
                            curve_serverkey=curve.public)  # fmt: skip
        stranger = _requester(ctx, pub.replay_endpoint, curve_publickey=sp, curve_secretkey=ss,
                              curve_serverkey=curve.public)  # fmt: skip
        plain = _requester(ctx, pub.replay_endpoint)
        for s in (member, stranger, plain):
            _ask(s)
        assert _read_replay(member) == [0, 1]
        assert _read_replay(stranger, timeout_ms=300) is None
        assert _read_replay(plain, timeout_ms=300) is None
        assert curve.ring.refused >= 1
        # The live stream is on the same certificate: a plaintext subscriber gets nothing.
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(pub.endpoint)
        sub.poll(200)
        _fill(pub, 1)
        assert not sub.poll(300)
    finally:
        pub.close()


def test_ipc_replay_socket_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "replay"
    pub = EventPublisher(f"ipc://{tmp_path}/ev", replay_endpoint=f"ipc://{path}")
    try:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE((tmp_path / "ev").stat().st_mode) & 0o077 == 0
    finally:
        pub.close()


def test_tcp_events_need_the_fleet_certificate_or_insecure() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"events.endpoint": "tcp://*:5557"})
    assert exc.value.key == "events.endpoint"
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"events.endpoint": "ipc:///tmp/x",
                                       "events.replay_endpoint": "tcp://*:5558"})  # fmt: skip
    assert exc.value.key == "events.replay_endpoint"
    cfg = load_config(env={}, overrides={"events.endpoint": "tcp://*:5557",
                                         "events.insecure": "true"})  # fmt: skip
    assert cfg.events.insecure
    load_config(env={}, overrides={"events.endpoint": "ipc:///tmp/x",
                                   "events.replay_endpoint": "ipc:///tmp/y"})  # fmt: skip


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_agent_answers_lookups_and_stops_while_requesters_never_read(
    tmp_path: Path, ctx: zmq.Context
) -> None:
    """48 connections ask for the whole buffer again and again and never read. Before
    replays left the loop thread this took lookups past 2 s and the agent's memory up
    by hundreds of MiB; now every lookup answers within the client's 1 s timeout and
    memory stays within the replay bounds."""
    replay = f"tcp://127.0.0.1:{free_port()}"
    agent = AgentProcess(tmp_path / "run", cpu_bytes="128MiB", args=[
        "--set", f"events.endpoint=ipc://{tmp_path}/events",
        "--set", f"events.replay_endpoint={replay}",
        "--set", "events.insecure=true",
        "--set", "events.replay_requesters_max=8",
        "--set", "events.replay_requester_bytes_max=1MiB",
        "--set", "arena.prefault=false",
    ]).start()  # fmt: skip
    client = AgentClient(agent.runtime_dir, name="lookups", timeout_s=1.0)
    socks: list[zmq.Socket] = []
    try:
        parent = b""
        for i in range(600):  # 16 chunks a commit, 512 tokens each: about 12 MiB of events
            keys = [(i * 16 + j).to_bytes(16, "big") for j in range(16)]
            data = os.urandom(1024)
            slots = client.reserve(keys, [len(data)] * 16)
            for _, slot in slots:
                assert slot is not None
                client.write(slot, data)
            parents = [parent, *keys[:-1]]
            tokens = [list(range(k, k + 512)) for k in range(16)]
            assert client.commit(keys, [checksum(data)] * 16, parents, tokens) == [Status.OK] * 16
            parent = keys[-1]
        rss_filled = _rss_mib(agent.proc.pid)  # type: ignore[union-attr]
        socks = [_requester(ctx, replay, reads=False) for _ in range(48)]
        for _ in range(40):
            for s in socks:
                _ask(s)
        rss_peak = rss_filled
        for _ in range(300):  # raises AgentUnavailable past the 1 s timeout
            client.lookup([b"\0" * 16])
            rss_peak = max(rss_peak, _rss_mib(agent.proc.pid))  # type: ignore[union-attr]
        st = client.stats()["events"]
        assert st["replay_refused"] > 0 and st["replay_rate_limited"] > 0
        assert st["replay_requesters"] <= 8
        assert st["replay_queued_bytes"] <= 8 * (1 << 20) + 8 * st["replay_ring_bytes"] // max(
            st["replay_ring_batches"], 1
        )
        assert rss_peak - rss_filled < 100, (rss_filled, rss_peak)
        for s in socks:
            s.close(0)
        _until(lambda: client.stats()["events"]["replay_requesters"] == 0, "requesters forgotten")
    finally:
        client.close()
        for s in socks:
            s.close(0)
        proc = agent.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10.0)  # raises if SIGTERM did not stop it
        segment = load_config(env={}, overrides={"agent.runtime_dir": str(agent.runtime_dir)})
        arena_left = Path("/dev/shm", segment.segment_name.lstrip("/")).exists()
        agent.stop()
    assert rc == 0 and not arena_left
