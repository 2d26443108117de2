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
``[id, b"", b"", -1, b""]``; it is served on its own thread within per-requester
bounds (``kvnode.agent.replay``). tcp sockets are on the fleet's CURVE certificate
unless ``events.insecure``; ipc sockets are owner-only files.

The structs below repeat vLLM's field order, tags and encoding options exactly (the
agent must not need vLLM installed); the tests decode our frames with vLLM's classes.
Events queue per loop tick; ``flush()`` sends them as one batch. Nothing here blocks:
the queue has a bound (overflow is dropped and counted) and PUB drops at its
high-water mark.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import msgspec
import zmq

from kvnode.agent.replay import (
    END_SEQ,
    SNAP_ARENA,
    SNAP_STORAGE,
    Change,
    ReplayLimits,
    ReplayRing,
    ReplayServer,
)

if TYPE_CHECKING:
    from kvnode.agent.config import Config
    from kvnode.agent.peers import Curve

log = logging.getLogger("kvnode.events")

MEDIUM_CPU = "CPU"  # the arena
MEDIUM_STORAGE = "STORAGE"  # disk and S3
BATCH_EVENTS_MAX = 4096  # events in one published batch (a tick with more sends several)
ZAP_DOMAIN = "kvnode-events"
REQUEST_BYTES_MAX = 1024  # a replay request is 8 bytes (CURVE handshake frames are larger)


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
    thread-safe): ``stored``/``removed``/``cleared`` queue, ``flush`` sends. Replays are
    served by a ``ReplayServer`` thread from a ring the loop appends to.

    Who may connect: a tcp socket the agent binds is a CURVE server on the fleet
    certificate (``curve``), admitting the authorized keys; one it connects to a
    collector presents that certificate. ``curve=None`` on tcp is plaintext (the caller
    checked ``events.insecure``). An ipc socket is a file, owner-only (group ``group``
    too when set)."""

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
        replay_bytes_max: int = 256 << 20,
        replay_limits: ReplayLimits | None = None,
        curve: Curve | None = None,
        group: str = "",
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
        self.ring = ReplayRing(replay_batches_max, replay_bytes_max)
        self.counters = dict.fromkeys(("batches", "events", "dropped", "send_errors"), 0)
        self.curve = curve
        self._group = group
        self._auth: Any = None
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay: ReplayServer | None = None
        try:
            self._open(endpoint, replay_endpoint, hwm, replay_limits or ReplayLimits())
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg: Config, curve: Curve | None = None) -> EventPublisher:
        """The publisher ``cfg.events`` describes; ``curve``: the fleet certificate
        already loaded for peers (loaded here when tcp needs it and none is given)."""
        e = cfg.events
        if curve is None:
            curve = events_curve(cfg)
        limits = ReplayLimits(
            e.replay_requesters_max, e.replay_requests_per_s, e.replay_requester_bytes_max,
            e.replay_requester_bytes_per_s, e.replay_stall_s,
        )  # fmt: skip
        return cls(
            e.endpoint, e.topic, e.replay_endpoint, e.hwm, e.queue_max, e.replay_batches_max,
            replay_bytes_max=e.replay_bytes_max, replay_limits=limits,
            curve=curve if events_need_curve(cfg) else None, group=cfg.agent.group,
        )  # fmt: skip

    def _open(self, endpoint: str, replay_endpoint: str, hwm: int, limits: ReplayLimits) -> None:
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub_bound = is_bind_endpoint(endpoint)
        self._attach(self._pub, endpoint, bind=self._pub_bound)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint = ""
        if replay_endpoint:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, REQUEST_BYTES_MAX)
            try:
                self._attach(sock, replay_endpoint, bind=True)
            except BaseException:
                sock.close(0)
                raise
            self.replay_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay = ReplayServer(
                sock, self.ring, self._topic, limits, snapshots=self._snapshot_payloads
            )
            self._replay.start()

    def _attach(self, sock: zmq.Socket, endpoint: str, bind: bool) -> None:
        tcp = endpoint.startswith("tcp://")
        if tcp and self.curve is not None:
            self._secure(sock, server=bind)
        if not bind:
            sock.connect(endpoint)
            return
        ipc = endpoint.startswith("ipc://")
        old_umask = os.umask(0o117 if self._group else 0o177) if ipc else None
        try:
            sock.bind(endpoint)
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if ipc and self._group:
            from kvnode.agent.runtime import chgrp

            chgrp(Path(endpoint.removeprefix("ipc://")), self._group)

    def _secure(self, sock: zmq.Socket, server: bool) -> None:
        curve = self.curve
        assert curve is not None
        if not server:
            use_curve(sock, curve, server=False)  # a collector on the fleet certificate
            return
        if self._auth is None:
            # The authenticator must run before bind: without a ZAP handler libzmq
            # admits any client that knows the server key.
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("kvnode.events.zap"))
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, curve.ring)
        use_curve(sock, curve, server=True)

    def _snapshot_payloads(self, items: list[tuple[bytes, int]]) -> Iterator[bytes]:
        """Replay thread: the announced state, encoded batch by batch as it is sent."""
        encoder = msgspec.msgpack.Encoder()
        for batch in snapshot_batches(items, time.time(), self.block_size):
            yield encoder.encode(batch)

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
        """Send the queued events (batches of at most ``BATCH_EVENTS_MAX``). Never
        blocks. Returns the batches sent."""
        sent = 0
        while self._queue:
            n = min(len(self._queue), BATCH_EVENTS_MAX)
            events = [self._queue.popleft() for _ in range(n)]
            self._send(KVEventBatch(ts=self._clock(), events=events))
            sent += 1
        return sent

    def _send(self, batch: KVEventBatch) -> None:
        payload = self._encoder.encode(batch)
        seq = self._seq
        self._seq += 1
        self.ring.append(seq, payload, changes_of(batch.events))
        try:
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a PUB socket drops rather than block; count the rest
            self.counters["send_errors"] += 1
            log.debug("event batch %d not sent: %s", seq, exc)
            return
        self.counters["batches"] += 1
        self.counters["events"] += len(batch.events)

    def sockets(self) -> list[zmq.Socket]:
        """Sockets the loop should poll: none (replays have their own thread)."""
        return []

    def tcp_ports(self) -> tuple[int, int]:
        """(PUB, replay) ports when both are bound on tcp, for peers' subscribers;
        (0, 0) otherwise (a collector endpoint or ipc: peers cannot follow it)."""
        pub, rep = self.endpoint, self.replay_endpoint
        if not (self._pub_bound and pub.startswith("tcp://") and rep.startswith("tcp://")):
            return 0, 0
        return int(pub.rsplit(":", 1)[1]), int(rep.rsplit(":", 1)[1])

    def reload_keys(self) -> None:
        """SIGHUP: the authorized directory again (a key rotation)."""
        if self.curve is not None:
            self.curve.ring.reload()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        if self._replay is not None:
            out.update(self._replay.stats())
        out["queued"] = len(self._queue)
        out["seq"] = self._seq
        out["endpoint"] = self.endpoint
        return out

    def close(self) -> None:
        if self._replay is not None:
            self._replay.stop()  # it closes its socket
            if self._replay.is_alive():
                log.error("the replay thread did not stop; its context is left open")
                self._own_ctx = False
        self._replay = None
        self._pub.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False


def changes_of(events: Sequence[Event]) -> list[Change]:
    """What a batch does to the set of announced (key, medium) pairs, in order."""
    out: list[Change] = []
    for ev in events:
        if isinstance(ev, AllBlocksCleared):
            out.append((b"", 0, False))
            continue
        bit = SNAP_ARENA if ev.medium == MEDIUM_CPU else SNAP_STORAGE
        on = isinstance(ev, BlockStored)
        out.extend((k, bit, on) for k in ev.block_hashes if isinstance(k, bytes))
    return out


def snapshot_batches(
    items: Sequence[tuple[bytes, int]], ts: float, block_size: int
) -> Iterator[KVEventBatch]:
    """A publisher's announced state as batches: ``AllBlocksCleared``, then one
    ``BlockStored`` per (key, medium) with no tokens (a snapshot keeps keys only)."""
    events: list[Event] = [AllBlocksCleared()]
    for key, bits in items:
        for bit, medium in ((SNAP_ARENA, MEDIUM_CPU), (SNAP_STORAGE, MEDIUM_STORAGE)):
            if bits & bit:
                events.append(BlockStored([key], None, [], block_size, None, medium, None))
        if len(events) >= BATCH_EVENTS_MAX:
            yield KVEventBatch(ts=ts, events=events)
            events = []
    if events:
        yield KVEventBatch(ts=ts, events=events)


def use_curve(sock: zmq.Socket, curve: Curve, server: bool) -> None:
    """Put ``sock`` on the fleet certificate: as a server (admission is the ZAP
    handler's, started on the socket's context before it binds) or as a client of a
    server presenting it. Call before bind or connect."""
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    if server:
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
    else:
        sock.curve_serverkey = curve.public


def events_curve(cfg: Config) -> Curve | None:
    """The fleet certificate when the events' tcp sockets need it, for tools and
    subscribers that read this configuration's stream."""
    if not events_need_curve(cfg):
        return None
    from kvnode.agent.peers import Curve

    return Curve.load(cfg.peers.curve_secret_key, cfg.peers.curve_authorized_dir)


def events_need_curve(cfg: Config) -> bool:
    """tcp endpoints are on the fleet certificate unless ``events.insecure`` (or the
    whole fleet runs without one, ``peers.insecure``)."""
    e = cfg.events
    tcp = any(ep.startswith("tcp://") for ep in (e.endpoint, e.replay_endpoint))
    return tcp and not (e.insecure or cfg.peers.insecure)


__all__ = [
    "MEDIUM_CPU",
    "MEDIUM_STORAGE",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "END_SEQ",
    "EventPublisher",
    "KVEventBatch",
    "changes_of",
    "events_curve",
    "snapshot_batches",
    "events_need_curve",
    "use_curve",
]
