"""KV cache events in vLLM's own wire format, so routers built for vLLM read kvnode.

A ZeroMQ PUB socket sends multipart ``[topic, seq, payload]``: ``seq`` is the batch's
sequence number (8 bytes, big-endian, from 0), ``payload`` a msgpack ``KVEventBatch``.
One ``BlockStored`` per chunk: the chunk key is the block hash (a chunk is the smallest
unit kvnode can serve on its own, so the blocks inside it are never advertised),
``block_size`` is the chunk's token count, ``medium`` is ``CPU`` for the arena and
``STORAGE`` for disk and S3, which are named in ``ownership`` (vLLM's "secondary
offloading tier" field). ``BlockRemoved`` and ``AllBlocksCleared`` follow vLLM's
definitions. An optional ROUTER socket answers replay requests as vLLM's publisher
does: ``[id, b"", start_seq]`` gets every buffered batch from ``start_seq`` on, then
``[id, b"", b"", -1, b""]``.

The structs below repeat vLLM's field order, tags and encoding options exactly (the
agent must not need vLLM installed); the tests decode our frames with vLLM's classes.
Events queue per loop tick; ``flush()`` sends them as one batch. Nothing here blocks:
the queue has a bound (overflow is dropped and counted) and PUB drops at its
high-water mark.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union

import msgspec
import zmq

log = logging.getLogger("kvnode.events")

MEDIUM_CPU = "CPU"  # the arena
MEDIUM_STORAGE = "STORAGE"  # disk and S3
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # replay: no more batches
BATCH_EVENTS_MAX = 4096  # events in one published batch (a tick with more sends several)
REPLAY_REQUESTS_PER_FLUSH_MAX = 16  # replay requests served per flush (the loop goes on)


# -- vLLM's wire structs (same names: msgspec tags events by class name) -------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[Union[bytes, int]]
    parent_block_hash: Union[bytes, int, None]
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[Union[bytes, int]]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


def is_bind_endpoint(endpoint: str) -> bool:
    """Wildcard, ipc:// and inproc:// endpoints are bound; others are connected to
    (a collector that binds), as vLLM does."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class EventPublisher:
    """Publishes the agent's KV events. Loop thread only (ZeroMQ sockets are not
    thread-safe): ``stored``/``removed``/``cleared`` queue, ``flush`` sends."""

    def __init__(
        self,
        endpoint: str,
        topic: str = "",
        replay_endpoint: str = "",
        hwm: int = 100_000,
        queue_max: int = 100_000,
        replay_batches_max: int = 10_000,
        block_size: int = 0,
        ctx: zmq.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._own_ctx = ctx is None
        self._ctx = zmq.Context() if ctx is None else ctx
        self._topic = topic.encode()
        self._queue: deque[Event] = deque()
        self.queue_max = queue_max
        self.block_size = block_size  # used when a chunk's tokens are not known
        self._clock = clock
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._replay_buf: deque[tuple[int, bytes]] = deque(maxlen=replay_batches_max)
        self.counters = dict.fromkeys(
            ("batches", "events", "dropped", "send_errors", "replays", "bad_replays"), 0
        )
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket | None = None
        try:
            self._open(endpoint, replay_endpoint, hwm)
        except zmq.ZMQError:
            self.close()
            raise

    def _open(self, endpoint: str, replay_endpoint: str, hwm: int) -> None:
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        if is_bind_endpoint(endpoint):
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint = ""
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.setsockopt(zmq.SNDHWM, hwm)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- events (queued until flush) -----------------------------------------------
    def stored(
        self,
        key: bytes,
        parent: bytes | None,
        tokens: Sequence[int],
        medium: str = MEDIUM_CPU,
        tier: str | None = None,
    ) -> None:
        """A chunk became readable in ``medium``. ``parent``: the previous chunk's
        key (None or b"" for a prompt's first chunk). ``tokens`` may be empty when the
        client did not send them; ``block_size`` then falls back to the configured one."""
        ev = BlockStored(
            block_hashes=[key],
            parent_block_hash=parent or None,
            token_ids=list(tokens),
            block_size=len(tokens) or self.block_size,
            lora_id=None,  # the chunk key already binds the adapter (namespace)
            medium=medium,
            lora_name=None,
            ownership=tier,
        )
        self._put(ev)

    def removed(self, key: bytes, medium: str = MEDIUM_CPU, tier: str | None = None) -> None:
        self._put(BlockRemoved(block_hashes=[key], medium=medium, ownership=tier))

    def cleared(self) -> None:
        """Everything this agent announced is gone (at start: a fresh arena)."""
        self._put(AllBlocksCleared())

    def _put(self, ev: Event) -> None:
        if len(self._queue) >= self.queue_max:
            self.counters["dropped"] += 1
            return
        self._queue.append(ev)

    # -- the loop's side ------------------------------------------------------------
    def flush(self) -> int:
        """Send the queued events (batches of at most ``BATCH_EVENTS_MAX``) and serve
        waiting replay requests. Never blocks. Returns the batches sent."""
        sent = 0
        while self._queue:
            n = min(len(self._queue), BATCH_EVENTS_MAX)
            events = [self._queue.popleft() for _ in range(n)]
            self._send(KVEventBatch(ts=self._clock(), events=events))
            sent += 1
        if self._replay is not None:
            self._serve_replays()
        return sent

    def _send(self, batch: KVEventBatch) -> None:
        payload = self._encoder.encode(batch)
        seq = self._seq
        self._seq += 1
        self._replay_buf.append((seq, payload))
        try:
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a PUB socket drops rather than block; count the rest
            self.counters["send_errors"] += 1
            log.debug("event batch %d not sent: %s", seq, exc)
            return
        self.counters["batches"] += 1
        self.counters["events"] += len(batch.events)

    def _serve_replays(self) -> None:
        sock = self._replay
        assert sock is not None
        for _ in range(REPLAY_REQUESTS_PER_FLUSH_MAX):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                self.counters["bad_replays"] += 1
                continue
            self._replay_from(frames[0], int.from_bytes(frames[2], "big"))

    def _replay_from(self, client: bytes, start_seq: int) -> None:
        sock = self._replay
        assert sock is not None
        self.counters["replays"] += 1
        try:
            for seq, payload in self._replay_buf:
                if seq >= start_seq:
                    msg = [client, b"", self._topic, seq.to_bytes(8, "big"), payload]
                    sock.send_multipart(msg, zmq.NOBLOCK)
            sock.send_multipart([client, b"", b"", END_SEQ, b""], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the requester went away or is not reading
            self.counters["send_errors"] += 1
            log.debug("replay to a subscriber cut short: %s", exc)

    def sockets(self) -> list[zmq.Socket]:
        """Sockets the loop may poll to flush replays sooner (optional)."""
        return [self._replay] if self._replay is not None else []

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["queued"] = len(self._queue)
        out["seq"] = self._seq
        out["endpoint"] = self.endpoint
        return out

    def close(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(0)
        self._replay = None
        if self._own_ctx:
            self._ctx.term()


__all__ = [
    "MEDIUM_CPU",
    "MEDIUM_STORAGE",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventPublisher",
    "KVEventBatch",
]
