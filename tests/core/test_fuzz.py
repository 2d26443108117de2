"""Structure-aware fuzzing of a real agent: no frame stops it, every frame is answered
or dropped and counted, and a byte-exact round trip works afterwards."""

from __future__ import annotations

import os
import random
import time

import msgspec
import zmq

from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient, Status
from tests.conftest import AgentProcess

FRAMES_MIN = 10_000
V = bytes([P.PROTOCOL_VERSION])
TAGS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20]


def _bad_utf8(rng: random.Random) -> bytes:
    # msgpack str header with bytes that are not UTF-8
    body = bytes([0xFF, 0xFE, 0xC0, 0x80][rng.randrange(4)] for _ in range(rng.randrange(1, 8)))
    return bytes([0xA0 | len(body)]) + body


def _value(rng: random.Random) -> object:
    choices = [
        lambda: rng.randrange(-(2**63), 2**63),
        lambda: rng.choice([0, -1, 1, 2**63 - 1, 2**64 - 1, 2**32]),
        lambda: os.urandom(rng.choice([0, 1, 15, 16, 17, 64, 65])),
        lambda: "x" * rng.choice([0, 1, 64, 65, 1000]),
        lambda: [os.urandom(16)] * rng.choice([0, 1, 3]),
        lambda: [[1, 2], "a"],
        lambda: {"a": 1},
        lambda: None,
        lambda: 1.5,
        lambda: True,
    ]
    return rng.choice(choices)()


def _frame(rng: random.Random, cid: int, gen: int) -> list[bytes]:
    kind = rng.randrange(10)
    if kind == 0:  # well-formed array, random element types
        tag = rng.choice(TAGS + [0, 12, 63, 127, 255])
        return [V + msgspec.msgpack.encode([tag] + [_value(rng) for _ in range(rng.randrange(7))])]
    if kind == 1:  # Hello with invalid UTF-8 or bad fields
        raw = b"\x94\x01" + bytes([rng.randrange(128)]) + _bad_utf8(rng) + b"\x01"
        return [V + raw]
    if kind == 2:  # a valid request, truncated
        full = P.encode(P.ReserveReq(1, cid, gen, [os.urandom(16)] * 3, [100, 200, 300]))
        return [full[: rng.randrange(len(full))]]
    if kind == 3:  # huge claimed lengths
        return [
            V
            + rng.choice(
                [b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"]
            )
        ]
    if kind == 4:  # out-of-range values in otherwise valid requests
        return [
            V
            + msgspec.msgpack.encode(
                [4, 1, cid, gen, [os.urandom(16)], [rng.choice([-1, 2**62, 2**64 - 1])]]
            )
        ]
    if kind == 5:  # calls out of order with this client's own identity
        key = os.urandom(16)
        msg = rng.choice(
            [
                P.CommitReq(2, cid, gen, [key], [5]),
                P.ReleaseReq(3, cid, gen, [key]),
                P.AbortReq(4, cid, gen, [key]),
                P.PinReq(5, cid, gen, [key]),
                P.CommitReq(6, cid, gen, [key, key], [1]),  # lengths differ
                P.ReserveReq(7, cid, gen, [key], [1, 2]),
                P.LookupReq(8, cid, gen + 1, [key]),  # stale generation
                P.Heartbeat(9, cid ^ 1, gen),  # someone else's id
            ]
        )
        return [P.encode(msg)]
    if kind == 6:  # wrong version byte
        return [bytes([rng.randrange(256)]) + os.urandom(rng.randrange(20))]
    if kind == 7:  # several frames
        return [os.urandom(rng.randrange(1, 10)) for _ in range(rng.randrange(2, 4))]
    if kind == 8:  # nested deep
        return [V + b"\x91" * rng.randrange(1, 2000) + b"\x01"]
    return [os.urandom(rng.randrange(0, 100))]


def test_ten_thousand_fuzzed_frames(agent: AgentProcess) -> None:
    rng = random.Random(20261128)
    ctx = zmq.Context.instance()
    me = AgentClient(agent.runtime_dir, name="fuzzer", timeout_s=2.0, heartbeat=False)
    me.connect()
    cid, gen = me.client_id, me.generation
    socks = []
    for _ in range(4):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"ipc://{agent.runtime_dir / 'agent.sock'}")
        socks.append(s)
    sent = replies = 0
    t0 = time.monotonic()
    while sent < FRAMES_MIN:
        s = socks[sent % len(socks)]
        s.send_multipart(_frame(rng, cid, gen))
        sent += 1
        if sent % 200 == 0:
            for s2 in socks:
                while s2.poll(0):
                    s2.recv()
                    replies += 1
    # every socket still gets answers: the agent did not hang
    deadline = time.monotonic() + 10
    for s in socks:
        s.send(P.encode(P.StatsReq(424242)))
    alive = 0
    for s in socks:
        while time.monotonic() < deadline and s.poll(2000):
            rep = P.decode_reply(s.recv())
            replies += 1
            if rep.rid == 424242:
                alive += 1
                break
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    assert alive == len(socks), "a socket got no answer: the agent hung"
    with AgentClient(agent.runtime_dir, name="check", timeout_s=2.0) as c:
        data = os.urandom(300_000)
        assert c.put(b"F" * 16, data) == Status.OK
        assert c.get(b"F" * 16) == data
        st = c.stats()
    counted = (
        st["counters"]["bad_frames"]
        + st["counters"]["refused_identity"]
        + st["counters"]["refused_stale"]
    )
    print(
        f"fuzz: {sent} frames, {replies} replies, {counted} counted refusals, 0 crashes, 0 hangs, {elapsed:.1f}s"
    )
    assert counted > sent // 3
    assert st["counters"]["errors"] == 0, "a frame reached a handler's internal error"
    me.close()
