"""Identity is bound to the connection and the generation: a guessed or stolen client
id is worth nothing from another socket, and unverified bytes are never returned as
good."""

from __future__ import annotations

import os

import pytest
import zmq

from kvnode.errors import ChecksumError
from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient, Status, checksum
from tests.conftest import AgentProcess


def _raw(agent: AgentProcess) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 2000)
    s.connect(f"ipc://{agent.runtime_dir / 'agent.sock'}")
    return s


def _ask(s: zmq.Socket, msg: object) -> object:
    s.send(P.encode(msg))  # type: ignore[arg-type]
    return P.decode_reply(s.recv())


def test_ids_are_unguessable_and_distinct(agent: AgentProcess) -> None:
    ids = set()
    for i in range(8):
        with AgentClient(agent.runtime_dir, name=f"c{i}", heartbeat=False) as c:
            c.connect()
            ids.add(c.client_id)
    assert len(ids) == 8
    assert all(i >= 2**40 for i in ids) or len({i >> 32 for i in ids}) > 1
    assert not any(b - a == 1 for a, b in zip(sorted(ids), sorted(ids)[1:]))


def test_forged_requests_from_another_socket_are_refused(agent: AgentProcess) -> None:
    victim = AgentClient(agent.runtime_dir, name="victim", timeout_s=2.0, heartbeat=False)
    victim.connect()
    data = os.urandom(512 * 1024)
    key, pinned = b"V" * 16, b"P" * 16
    ((st, slot),) = victim.reserve([key], [len(data)])
    assert st == Status.OK and slot is not None
    victim.write(slot, data[: len(data) // 2] + bytes(len(data) // 2))  # half written
    assert victim.put(pinned, b"p" * 1000) == Status.OK
    assert victim.pin([pinned])[0][0] == Status.OK
    cid, gen = victim.client_id, victim.generation
    attacker = _raw(agent)
    forged = [
        P.CommitReq(1, cid, gen, [key], [0]),
        P.AbortReq(2, cid, gen, [key]),
        P.ReleaseReq(3, cid, gen, [pinned]),
        P.Bye(4, cid, gen),
        P.Heartbeat(5, cid, gen),
        P.PinReq(6, cid, gen, [pinned]),
    ]
    for m in forged:
        rep = _ask(attacker, m)
        assert isinstance(rep, P.Error) and rep.code == P.ErrCode.UNKNOWN_CLIENT, (m, rep)
    # A registered attacker using its own id cannot commit or abort the victim's lease.
    w = _ask(attacker, P.Hello(7, "attacker", os.getpid()))
    assert isinstance(w, P.Welcome)
    rep = _ask(attacker, P.CommitReq(8, w.client_id, w.generation, [key], [0]))
    assert isinstance(rep, P.StatusRep) and rep.status == [P.Status.BAD_STATE]
    _ask(attacker, P.AbortReq(9, w.client_id, w.generation, [key]))
    attacker.close()
    # The victim's state is intact: its lease, its pin, its registration.
    victim.write(slot, data)
    assert victim.commit([key], [checksum(data)]) == [Status.OK]
    assert victim.get(key) == data
    victim.release([pinned])
    s = victim.stats()
    assert s["counters"]["refused_identity"] >= len(forged)
    assert s["counters"]["refused_commits"] >= 1
    assert s["arena"]["pinned"] == 0
    victim.close()


def test_unverified_entry_is_not_returned_as_good(client: AgentClient) -> None:
    assert client.put(b"U" * 16, b"no checksum", with_checksum=False) == Status.OK
    with pytest.raises(ChecksumError, match="unverified"):
        client.get(b"U" * 16)
    assert client.get(b"U" * 16, verify=False) == b"no checksum"


def test_stale_generation_is_answered_as_such(agent: AgentProcess) -> None:
    s = _raw(agent)
    rep = _ask(s, P.LookupReq(1, 12345, 777, [b"k" * 16]))
    assert isinstance(rep, P.Error) and rep.code == P.ErrCode.STALE_GENERATION
    s.close()
