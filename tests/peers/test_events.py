"""KV events decoded by a real consumer: vLLM's own KVEventBatch decoder."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from kvnode.agent.events import END_SEQ, MEDIUM_CPU, MEDIUM_STORAGE, EventPublisher

kv_events = pytest.importorskip(
    "vllm.distributed.kv_events", reason="vLLM is not installed: no reference decoder"
)
DECODER = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
K1, K2 = b"\x01" * 16, b"\x02" * 16


@pytest.fixture
def pub() -> Iterator[EventPublisher]:
    p = EventPublisher("tcp://127.0.0.1:*", topic="kv", replay_endpoint="tcp://127.0.0.1:*",
                       block_size=256)  # fmt: skip
    yield p
    p.close()


def _subscribe(ctx: zmq.Context, pub: EventPublisher) -> zmq.Socket:
    """A SUB that is surely connected: PUB drops what it sends before that."""
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(pub.endpoint)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        pub.cleared()
        pub.flush()
        if sub.poll(20):
            while sub.poll(50):
                sub.recv_multipart()
            return sub
    raise AssertionError("subscriber never connected")


def test_events_decode_with_vllms_own_types(pub: EventPublisher) -> None:
    ctx = zmq.Context()
    sub = _subscribe(ctx, pub)
    pub.stored(K1, None, list(range(256)), MEDIUM_CPU)
    pub.stored(K2, K1, [], MEDIUM_STORAGE, tier="disk")  # tokens not sent by the client
    pub.removed(K1, MEDIUM_CPU)
    pub.cleared()
    assert pub.flush() == 1
    assert sub.poll(2000)
    topic, seq, payload = sub.recv_multipart()
    assert topic == b"kv" and len(seq) == 8
    assert int.from_bytes(seq, "big") == pub.stats()["seq"] - 1
    batch = DECODER.decode(payload)
    stored1, stored2, removed, cleared = batch.events
    assert isinstance(stored1, kv_events.BlockStored)
    assert stored1.block_hashes == [K1] and stored1.parent_block_hash is None
    assert stored1.token_ids == list(range(256)) and stored1.block_size == 256
    assert stored1.medium == "CPU" and stored1.lora_id is None and stored1.lora_name is None
    assert stored2.parent_block_hash == K1 and stored2.token_ids == []
    assert stored2.block_size == 256 and stored2.medium == "STORAGE" and stored2.ownership == "disk"
    assert isinstance(removed, kv_events.BlockRemoved) and removed.block_hashes == [K1]
    assert removed.medium == "CPU"
    assert isinstance(cleared, kv_events.AllBlocksCleared)
    assert batch.ts > 0 and batch.data_parallel_rank is None
    sub.close(0)
    ctx.term()


def test_replay_from_a_sequence_number(pub: EventPublisher) -> None:
    for i in range(5):
        pub.stored(bytes([i]) * 16, None, [i], MEDIUM_CPU)
        pub.flush()
    ctx = zmq.Context()
    req = ctx.socket(zmq.DEALER)
    req.linger = 0
    req.connect(pub.replay_endpoint)
    req.send_multipart([b"", (3).to_bytes(8, "big")])
    got: list[list[bytes]] = []
    end = time.monotonic() + 5
    while time.monotonic() < end and not (got and got[-1][2] == END_SEQ):
        pub.flush()  # the loop's tick serves replay requests
        if req.poll(10):
            got.append(req.recv_multipart())
    assert got and got[-1] == [b"", b"", END_SEQ, b""]
    seqs = [int.from_bytes(m[2], "big") for m in got[:-1]]
    assert seqs == [3, 4]
    events = [DECODER.decode(m[3]).events[0] for m in got[:-1]]
    assert [e.block_hashes for e in events] == [[b"\x03" * 16], [b"\x04" * 16]]
    req.close(0)
    ctx.term()


def test_queue_is_bounded_and_drops_are_counted() -> None:
    p = EventPublisher("inproc://kvnode-events-bound", queue_max=3)
    try:
        for i in range(5):
            p.removed(bytes([i]) * 16)
        assert p.stats()["dropped"] == 2 and p.stats()["queued"] == 3
        assert p.flush() == 1 and p.stats()["events"] == 3
    finally:
        p.close()
