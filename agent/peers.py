"""Peers: agents of a fleet serve each other's misses over authenticated ZeroMQ.

Two halves, each with one owner:

- ``PeerServer`` (the agent's loop thread): a ROUTER socket on ``peers.listen``. It
  answers ``HaveReq`` (which of these keys do you hold: committed arena entries, and
  keys a lower tier starts promoting) and ``FetchReq`` (send me these keys). Sends go
  straight out of the arena, zero-copy: the entries stay pinned (``Index.pin``) until
  ZeroMQ lets go of the bytes, which ``poll()`` notices. Checksums travel with them.
- ``PeerManager`` (loop side) plus one network thread. ``on_lookup_miss`` accepts keys
  at once (the agent answers PENDING), the thread asks every usable peer in one
  batched ``HaveReq`` each, in parallel, until all answered or ``deadline_ms``; the
  loop then reserves arena pages as the agent (``AGENT_OWNER``) for the longest prefix
  one peer holds, the thread fetches into them and verifies sizes and checksums on
  the bytes as they lie in the arena, and ``poll()`` commits or aborts. The loop
  never waits on the network; the thread never touches the index.

Security: CURVE on every link. A fleet shares one certificate: it is this agent's
server key and client key, and its public key is the server key of outgoing links
(plus the other keys of ``curve_authorized_dir`` during a rotation: one DEALER per
candidate server key, and with ``ZMQ_IMMEDIATE`` only the one whose handshake
succeeded takes messages). A ZAP handler, started before the socket binds, admits
only client keys found in ``curve_authorized_dir`` and counts refusals. Messages are
msgspec structs with a version byte; nothing is pickled.

A peer is the connection, never what it says: replies are matched to the socket they
came in on and to a request id we chose; a reply to a request that already timed out
is dropped before it can touch a slot.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union

import msgspec
import xxhash
import zmq
import zmq.auth
from msgspec import Meta

from kvnode.agent.index import AGENT_OWNER, Entry, Index, State
from kvnode.errors import ConfigError, PeerError, ProtocolError
from kvnode.ipc.segment import Segment

log = logging.getLogger("kvnode.peers")

# -- wire -----------------------------------------------------------------------------
PEER_PROTOCOL_VERSION = 1
_VERSION_BYTE = bytes([PEER_PROTOCOL_VERSION])
ZAP_DOMAIN = "kvnode-peers"
KEY_BYTES = 16
NODE_ID_BYTES = 16
PEER_KEYS_MAX = 4096  # keys in one peer request
REQUEST_BYTES_MAX = 1 << 20  # a request frame (keys only) larger than this is refused
U63 = (1 << 63) - 1

_Key = Annotated[bytes, Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
_Keys = Annotated[list[_Key], Meta(max_length=PEER_KEYS_MAX)]
_Rid = Annotated[int, Meta(ge=0, le=U63)]
_Node = Annotated[bytes, Meta(max_length=NODE_ID_BYTES)]
_Size = Annotated[int, Meta(ge=0, le=1 << 48)]
_Sizes = Annotated[list[_Size], Meta(max_length=PEER_KEYS_MAX)]
# uint64 checksums: msgpack itself bounds them (msgspec takes no bound past int64)
_Ints = Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=PEER_KEYS_MAX)]
_Tokens = Annotated[list[Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]], Meta(max_length=1 << 16)]


class Have:
    """Per-key answers of ``HaveRep.states``."""

    ABSENT = 0
    ARENA = 1  # committed in the peer's arena: fetchable now
    PENDING = 2  # a lower tier of the peer is promoting it: ask again soon


class _PeerMsg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    pass


class HaveReq(_PeerMsg, tag=1):
    rid: _Rid
    keys: _Keys


class FetchReq(_PeerMsg, tag=2):
    rid: _Rid
    keys: _Keys


class HaveRep(_PeerMsg, tag=64):
    rid: _Rid
    node: _Node
    states: _Sizes  # Have.* per key
    sizes: _Sizes  # payload bytes per key (0 unless ARENA)


class FetchRep(_PeerMsg, tag=65):
    """Followed by ``sum(frames)`` payload frames, key by key in request order. A key
    the sender no longer holds (or will not send now) has size 0 and no frames."""

    rid: _Rid
    node: _Node
    sizes: _Sizes
    checksums: _Ints  # xxh3-64 of each payload, never 0 for a sent key
    frames: _Sizes  # payload frames per key
    tokens: Annotated[list[_Tokens], Meta(max_length=PEER_KEYS_MAX)] = []  # [] = not known


class ErrorRep(_PeerMsg, tag=127):
    rid: _Rid
    message: Annotated[str, Meta(max_length=256)]


_PeerRequest = Union[HaveReq, FetchReq]
_PeerReply = Union[HaveRep, FetchRep, ErrorRep]
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(_PeerRequest)
_reply_decoder = msgspec.msgpack.Decoder(_PeerReply)


def encode(msg: _PeerMsg) -> bytes:
    return _VERSION_BYTE + _encoder.encode(msg)


def _decode(frame: bytes | memoryview, decoder: msgspec.msgpack.Decoder) -> Any:
    if len(frame) < 2 or frame[0] != PEER_PROTOCOL_VERSION:
        raise ProtocolError("peer frame: truncated or wrong protocol version")
    try:
        return decoder.decode(memoryview(frame)[1:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad peer frame: {exc}") from exc
    except (UnicodeDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"bad peer frame: {type(exc).__name__}") from exc


def decode_request(frame: bytes | memoryview) -> HaveReq | FetchReq:
    return _decode(frame, _request_decoder)  # type: ignore[no-any-return]


def decode_reply(frame: bytes | memoryview) -> HaveRep | FetchRep | ErrorRep:
    return _decode(frame, _reply_decoder)  # type: ignore[no-any-return]


def payload_checksum(parts: Iterable[Any]) -> int:
    """The project's payload checksum (xxh3-64, never 0) over consecutive buffers."""
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.intdigest() or 1


def new_node_id() -> bytes:
    """This agent generation's id: a reply carrying our own id means the seed list
    (a headless Service lists every pod) led us to ourselves."""
    return os.urandom(NODE_ID_BYTES)


# -- certificates -----------------------------------------------------------------------
class KeyRing:
    """ZAP credentials provider: admits client keys found in the authorized directory
    and counts who it refuses. Called from the authenticator's thread."""

    def __init__(self, authorized_dir: str) -> None:
        self.authorized_dir = authorized_dir
        self._lock = threading.Lock()
        self.allowed = 0
        self.refused = 0
        self.keys: frozenset[bytes] = frozenset()
        self.reload()

    def reload(self) -> int:
        """Read the directory again (key rotation). Returns the number of keys."""
        if not Path(self.authorized_dir).is_dir():
            raise ConfigError(
                "peers.curve_authorized_dir", f"{self.authorized_dir}: no such directory"
            )
        self.keys = frozenset(zmq.auth.load_certificates(self.authorized_dir))
        return len(self.keys)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        with self._lock:
            if ok:
                self.allowed += 1
            else:
                self.refused += 1
        if not ok:
            log.warning("peer refused: unknown CURVE client key %s", key.decode(errors="replace"))
        return ok


@dataclass(frozen=True, slots=True)
class Curve:
    """The fleet certificate (z85) and the server keys outgoing links may meet: our own
    public key first, then the other authorized keys (a rotation in progress)."""

    public: bytes
    secret: bytes
    ring: KeyRing

    @classmethod
    def load(cls, secret_path: str, authorized_dir: str) -> Curve:
        try:
            public, secret = zmq.auth.load_certificate(secret_path)
        except (OSError, ValueError) as exc:
            raise ConfigError("peers.curve_secret_key", f"{secret_path}: {exc}") from exc
        if not secret:
            raise ConfigError("peers.curve_secret_key", f"{secret_path}: no secret key in it")
        return cls(public, secret, KeyRing(authorized_dir))

    def server_keys(self) -> list[bytes]:
        return [self.public, *sorted(k for k in self.ring.keys if k != self.public)]


# -- server -----------------------------------------------------------------------------
SERVE_BATCH_MAX = 64  # requests handled per handle() call before the loop goes on
SENDS_INFLIGHT_MAX = 1024  # replies whose arena bytes ZeroMQ still holds (pins kept)
SERVER_SNDHWM = 64  # replies queued per peer connection; beyond it ROUTER drops them
HEARTBEAT_IVL_MS = 1000  # ZMTP heartbeats: a silent connection is dropped, and with
HEARTBEAT_TIMEOUT_MS = 3000  # it every reply still holding pinned bytes


@dataclass(slots=True, eq=False)
class _Send:
    tracker: zmq.MessageTracker
    keys: list[bytes]
    nbytes: int


LowerHas = Callable[[bytes], bool]  # True: a lower tier holds the key and is promoting it
TokensOf = Callable[[bytes], "Sequence[int] | None"]


class PeerServer:
    """Answers peers from the index and the arena. Loop thread only: register
    ``socket`` for POLLIN, call ``handle()`` when it is readable and ``poll()`` in
    housekeeping (it unpins entries whose bytes have left)."""

    def __init__(
        self,
        index: Index,
        arena: Any,
        listen: str,
        curve: Curve | None,
        node_id: bytes,
        lower_has: LowerHas | None = None,
        tokens_of: TokensOf | None = None,
        serve_bytes_max: int = 512 << 20,
    ) -> None:
        self.index = index
        self._arena = _arena_view(arena)
        self.node_id = node_id
        self.lower_has = lower_has
        self.tokens_of = tokens_of
        self.serve_bytes_max = serve_bytes_max
        self.curve = curve
        self._sends: deque[_Send] = deque()
        self.bytes_inflight = 0
        self.counters = dict.fromkeys(
            ("have_requests", "have_keys", "fetch_requests", "served_keys", "served_bytes",
             "busy", "bad_frames", "errors"), 0,
        )  # fmt: skip
        self.ctx = zmq.Context()
        self.auth: Any = None
        try:
            self.socket = self._bind(listen)
        except BaseException:
            self._teardown()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _bind(self, listen: str) -> zmq.Socket:
        if self.curve is not None:
            # The authenticator must run before bind: without a ZAP handler libzmq
            # admits any client that knows the server key.
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("kvnode.peers.zap"))
            self.auth.start()
            self.auth.configure_curve_callback(ZAP_DOMAIN, self.curve.ring)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # an unroutable reply is dropped, not raised
        sock.setsockopt(zmq.MAXMSGSIZE, REQUEST_BYTES_MAX)
        sock.setsockopt(zmq.SNDHWM, SERVER_SNDHWM)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self.curve is not None:
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
        try:
            sock.bind(listen)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise PeerError(f"cannot listen on {listen}: {exc}") from exc
        return sock

    # -- requests ----------------------------------------------------------------------
    def handle(self) -> int:
        """Answer waiting requests (at most ``SERVE_BATCH_MAX``). Never blocks."""
        n = 0
        for n in range(SERVE_BATCH_MAX):  # noqa: B007 (n counts the handled requests)
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            self._handle(frames)
        return n + 1

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.counters["bad_frames"] += 1
            return
        ident, body = frames
        try:
            msg = decode_request(body)
        except ProtocolError as exc:
            self.counters["bad_frames"] += 1
            self.socket.send_multipart([ident, encode(ErrorRep(0, str(exc)[:256]))], zmq.NOBLOCK)
            return
        try:
            if isinstance(msg, HaveReq):
                self._on_have(ident, msg)
            else:
                self._on_fetch(ident, msg)
        except zmq.ZMQError as exc:  # an operating error on one reply: counted, loop goes on
            self.counters["errors"] += 1
            log.debug("peer reply not sent: %s", exc)

    def _committed(self, key: bytes) -> Entry | None:
        # No Index.lookup here: a peer's question must not move recency or hit counts.
        e = self.index.entries.get(key)
        return e if e is not None and e.state is State.COMMITTED else None

    def _on_have(self, ident: bytes, m: HaveReq) -> None:
        self.counters["have_requests"] += 1
        self.counters["have_keys"] += len(m.keys)
        states, sizes = [], []
        for key in m.keys:
            e = self._committed(key)
            if e is not None:
                states.append(Have.ARENA)
                sizes.append(e.size)
            elif self.lower_has is not None and self._lower_has(key):
                states.append(Have.PENDING)
                sizes.append(0)
            else:
                states.append(Have.ABSENT)
                sizes.append(0)
        rep = HaveRep(m.rid, self.node_id, states, sizes)
        self.socket.send_multipart([ident, encode(rep)], zmq.NOBLOCK)

    def _lower_has(self, key: bytes) -> bool:
        try:
            return bool(self.lower_has(key))  # type: ignore[misc]
        except Exception:
            self.counters["errors"] += 1
            log.exception("peer server: lower-tier probe failed")
            return False

    def _on_fetch(self, ident: bytes, m: FetchReq) -> None:
        self.counters["fetch_requests"] += 1
        rep = FetchRep(m.rid, self.node_id, [], [], [], [])
        payload: list[memoryview] = []
        pinned: list[bytes] = []
        for key in m.keys:
            views = self._pin_for_send(key, pinned)
            if views is None:
                rep.sizes.append(0)
                rep.checksums.append(0)
                rep.frames.append(0)
                continue
            e = self.index.entries[key]
            rep.sizes.append(e.size)
            rep.checksums.append(e.checksum or payload_checksum(views))
            rep.frames.append(len(views))
            payload.extend(views)
        if self.tokens_of is not None:
            rep.tokens = [
                list(self.tokens_of(k) or ()) if s else [] for k, s in zip(m.keys, rep.sizes)
            ]
        self._send_pinned(ident, rep, payload, pinned)

    def _pin_for_send(self, key: bytes, pinned: list[bytes]) -> list[memoryview] | None:
        e = self._committed(key)
        if e is None:
            return None
        if (
            self.bytes_inflight + e.size > self.serve_bytes_max
            or len(self._sends) >= SENDS_INFLIGHT_MAX
        ):
            self.counters["busy"] += 1
            return None
        if self.index.pin(key) is None:
            return None
        pinned.append(key)
        self.bytes_inflight += e.size
        return [self._arena[off : off + n] for off, n in e.extents(self.index.page_bytes)]

    def _send_pinned(
        self, ident: bytes, rep: FetchRep, payload: list[memoryview], pinned: list[bytes]
    ) -> None:
        """Zero-copy out of the arena. Every payload frame is tracked (not only the
        last, which is all ``send_multipart`` reports): the pins go when libzmq has let
        go of every frame, whether it sent or dropped them."""
        frames = [zmq.Frame(v, copy=False, track=True) for v in payload]
        nbytes = sum(len(v) for v in payload)
        if pinned:
            tracker = zmq.MessageTracker(*frames)
            self._sends.append(_Send(tracker, pinned, nbytes))
        self.socket.send_multipart([ident, encode(rep), *frames], zmq.NOBLOCK, copy=False)
        self.counters["served_keys"] += len(pinned)
        self.counters["served_bytes"] += nbytes

    def _unpin(self, keys: list[bytes], nbytes: int) -> None:
        for key in keys:
            self.index.unpin(key)
        self.bytes_inflight -= nbytes

    # -- housekeeping -----------------------------------------------------------------
    def poll(self) -> int:
        """Unpin entries whose bytes ZeroMQ has released. Returns replies finished."""
        keep: deque[_Send] = deque()
        done = 0
        for s in self._sends:  # one pass: a tracker read once is acted on once
            if s.tracker.done:
                self._unpin(s.keys, s.nbytes)
                done += 1
            else:
                keep.append(s)
        self._sends = keep
        return done

    def busy(self) -> bool:
        return bool(self._sends)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["refused"] = self.curve.ring.refused if self.curve is not None else 0
        out["admitted"] = self.curve.ring.allowed if self.curve is not None else 0
        out["sends_inflight"] = len(self._sends)
        out["bytes_inflight"] = self.bytes_inflight
        return out

    def close(self) -> None:
        """Close the socket (ZeroMQ drops what it still holds), then give back pins."""
        self._teardown()
        for s in self._sends:
            self._unpin(s.keys, s.nbytes)
        self._sends.clear()

    def _teardown(self) -> None:
        sock = getattr(self, "socket", None)
        if sock is not None:
            sock.close(0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


# -- client -------------------------------------------------------------------------------
LATENCY_SAMPLES_MAX = 256  # per peer, for the latency percentiles in stats
DOWN_AFTER_FAILURES = 3  # consecutive timeouts or bad replies before a peer is skipped
DOWN_BACKOFF_S_MIN = 1.0  # first pause of a peer marked down; doubles up to the max
DOWN_BACKOFF_S_MAX = 30.0
NEGATIVE_KEYS_MAX = 65536  # keys remembered as "no peer has it"
INBOX_MAX = 1024  # jobs waiting for the network thread
RECV_BATCH_MAX = 64  # replies read from one socket per wake-up
NET_POLL_MS_MAX = 100  # the network thread looks at its inbox and stop flag this often
CLOSE_JOIN_S = 5.0
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000


class PeerStats:
    """One peer's counters (network thread writes, loop reads)."""

    COUNTERS = ("lookups", "hits", "pending", "fetches", "fetched_keys", "bytes", "errors",
                "timeouts", "corrupt", "busy", "unreachable", "late")  # fmt: skip

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._latency_us: deque[float] = deque(maxlen=LATENCY_SAMPLES_MAX)
        self.state = "connecting"

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency_us.append(seconds * 1e6)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
            lat = sorted(self._latency_us)
        out["state"] = self.state
        out["latency_us_p50"] = round(lat[len(lat) // 2], 1) if lat else 0.0
        out["latency_us_p99"] = (
            round(lat[min(len(lat) - 1, len(lat) * 99 // 100)], 1) if lat else 0.0
        )
        return out


@dataclass(slots=True, eq=False)
class _Query:
    keys: list[bytes]
    parents: list[bytes | None]
    started: float = 0.0
    deadline: float = 0.0
    waiting: set[str] = field(default_factory=set)
    best: str = ""  # endpoint holding the longest prefix
    sizes: list[int] = field(default_factory=list)  # of that prefix
    promoting: set[bytes] = field(default_factory=set)  # keys a peer's lower tier is promoting
    done: bool = False


@dataclass(slots=True, eq=False)
class _Fetch:
    peer: str
    keys: list[bytes]
    parents: list[bytes | None]
    sizes: list[int]
    slots: list[list[memoryview]]  # the reserved arena pages of each key
    checksums: list[int]  # verified checksum per key; 0 = not landed
    tokens: list[list[int]]
    started: float = 0.0
    deadline: float = 0.0
    done: bool = False


_Job = Union[_Query, _Fetch]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A chunk committed into the arena from a peer (for events and write-through)."""

    key: bytes
    parent: bytes | None
    tokens: list[int]
    size: int


class _Link:
    """One peer endpoint: a DEALER per candidate server key (see module docstring)."""

    def __init__(self, endpoint: str, sockets: list[zmq.Socket], stats: PeerStats) -> None:
        self.endpoint = endpoint
        self.sockets = sockets
        self.stats = stats
        self.rid = 0
        self.outstanding: dict[int, _Job] = {}
        self.failures = 0
        self.down_until = 0.0
        self.backoff_s = DOWN_BACKOFF_S_MIN

    def usable(self, now: float) -> bool:
        return self.stats.state != "self" and now >= self.down_until

    def ok(self, seconds: float) -> None:
        self.failures = 0
        self.backoff_s = DOWN_BACKOFF_S_MIN
        self.stats.state = "up"
        self.stats.latency(seconds)

    def fail(self, now: float, counter: str) -> None:
        self.stats.inc(counter)
        self.failures += 1
        if self.failures >= DOWN_AFTER_FAILURES:
            self.down_until = now + self.backoff_s
            self.backoff_s = min(2 * self.backoff_s, DOWN_BACKOFF_S_MAX)
            self.stats.state = "down"


def split_extents(arena: memoryview, e: Entry, page_bytes: int) -> list[memoryview]:
    return [arena[off : off + n] for off, n in e.extents(page_bytes)]


def copy_into(dst: list[memoryview], src: Sequence[memoryview]) -> bool:
    """Copy consecutive source buffers into consecutive destination views. False (and
    nothing promised about ``dst``) when the total lengths differ."""
    if sum(len(s) for s in src) != sum(len(d) for d in dst):
        return False
    di, doff = 0, 0
    for s in src:
        soff = 0
        while soff < len(s):
            d = dst[di]
            n = min(len(s) - soff, len(d) - doff)
            d[doff : doff + n] = s[soff : soff + n]
            soff += n
            doff += n
            if doff == len(d):
                di, doff = di + 1, 0
    return True


class _Network(threading.Thread):
    """Owns every outgoing socket. Takes jobs from the loop, answers through
    ``on_done`` (then the loop's ``poll()``); writes only into slots of fetches it has
    not finished yet, so a late or hostile reply can never reach a freed page."""

    def __init__(
        self,
        curve: Curve | None,
        node_id: bytes,
        on_done: Callable[[_Job], None],
        deadline_s: float,
        fetch_timeout_s: float,
        queue_max: int,
        recv_bytes_max: int,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(name="kvnode-peers-net", daemon=True)
        self.curve = curve
        self.node_id = node_id
        self.on_done = on_done
        self.deadline_s = deadline_s
        self.fetch_timeout_s = fetch_timeout_s
        self.queue_max = queue_max
        self.recv_bytes_max = recv_bytes_max
        self.clock = clock
        self._lock = threading.Lock()
        self._inbox: deque[_Job] = deque()
        self._wanted: set[str] | None = None  # new endpoint set from the resolver
        self._rebuild = False  # certificates changed: re-create every link
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.links: dict[str, _Link] = {}
        self.peer_stats: dict[str, PeerStats] = {}  # read by the loop under _lock
        self._by_socket: dict[zmq.Socket, _Link] = {}
        self._ctx: zmq.Context | None = None
        self._poller = zmq.Poller()

    # -- any thread -------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full: a wake-up is already due

    def submit(self, job: _Job) -> bool:
        with self._lock:
            if self._stopping or len(self._inbox) >= INBOX_MAX:
                return False
            self._inbox.append(job)
        self._wake()
        return True

    def set_endpoints(self, endpoints: set[str]) -> None:
        with self._lock:
            self._wanted = set(endpoints)
        self._wake()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()

    def rebuild(self) -> None:
        with self._lock:
            self._rebuild = True
        self._wake()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            stats = list(self.peer_stats.items())
        return {ep: s.snapshot() for ep, s in stats}

    # -- the thread ---------------------------------------------------------------------
    def run(self) -> None:
        self._ctx = zmq.Context()
        self._poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stopping:
                self._step()
        except Exception:  # programmer error: say so, then fail every job cleanly
            log.exception("peer network thread failed")
        finally:
            self._shutdown()

    def _step(self) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, None
            rebuild, self._rebuild = self._rebuild, False
            jobs = list(self._inbox)
            self._inbox.clear()
        if rebuild:  # new server-key candidates apply to new sockets only
            current = set(self.links)
            for old in list(self.links.values()):
                self._drop_link(old)
            wanted = current if wanted is None else wanted
        if wanted is not None:
            self._reconcile(wanted)
        now = self.clock()
        for job in jobs:
            self._start(job, now)
        events = dict(self._poller.poll(self._timeout_ms()))
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        for sock in events:
            link = self._by_socket.get(sock)  # type: ignore[call-overload]
            if link is not None:
                self._recv(link, sock)  # type: ignore[arg-type]
        self._expire(self.clock())

    def _timeout_ms(self) -> int:
        deadlines = [j.deadline for lk in self.links.values() for j in lk.outstanding.values()]
        if not deadlines:
            return NET_POLL_MS_MAX
        left = min(deadlines) - self.clock()
        return max(0, min(NET_POLL_MS_MAX, int(left * 1000) + 1))

    # -- links --------------------------------------------------------------------------
    def _reconcile(self, wanted: set[str]) -> None:
        for ep in list(self.links):
            if ep not in wanted:
                self._drop_link(self.links[ep])
        for ep in sorted(wanted - set(self.links)):
            self._add_link(ep)

    def _add_link(self, endpoint: str) -> None:
        assert self._ctx is not None
        keys: list[bytes | None] = list(self.curve.server_keys()) if self.curve else [None]
        sockets = [self._dealer(endpoint, k) for k in keys]
        stats = self.peer_stats.get(endpoint) or PeerStats()
        link = _Link(endpoint, sockets, stats)
        self.links[endpoint] = link
        with self._lock:
            self.peer_stats[endpoint] = stats
        for s in sockets:
            self._by_socket[s] = link
            self._poller.register(s, zmq.POLLIN)

    def _dealer(self, endpoint: str, server_key: bytes | None) -> zmq.Socket:
        assert self._ctx is not None
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a peer not connected (yet)
        s.setsockopt(zmq.MAXMSGSIZE, self.recv_bytes_max)
        s.setsockopt(zmq.SNDHWM, self.queue_max)
        s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if "[" in endpoint:
            s.setsockopt(zmq.IPV6, 1)
        if self.curve is not None and server_key is not None:
            s.curve_secretkey = self.curve.secret
            s.curve_publickey = self.curve.public
            s.curve_serverkey = server_key
        s.connect(endpoint)
        return s

    def _drop_link(self, link: _Link) -> None:
        now = self.clock()
        for job in list(link.outstanding.values()):
            self._forget(link, job, now)
        link.outstanding.clear()
        for s in link.sockets:
            self._poller.unregister(s)
            self._by_socket.pop(s, None)
            s.close(0)
        del self.links[link.endpoint]
        with self._lock:
            self.peer_stats.pop(link.endpoint, None)

    def _send(self, link: _Link, make: Callable[[int], _PeerMsg]) -> int | None:
        """Send to whichever socket of ``link`` has a completed connection; the rid,
        or None when none has (peer down or still handshaking: costs nothing)."""
        link.rid += 1
        frame = encode(make(link.rid))
        for s in link.sockets:
            try:
                s.send(frame, zmq.NOBLOCK)
                return link.rid
            except zmq.Again:
                continue
        link.stats.inc("unreachable")
        if link.stats.state == "up":
            link.stats.state = "connecting"
        return None

    # -- jobs -----------------------------------------------------------------------------
    def _start(self, job: _Job, now: float) -> None:
        job.started = now
        if isinstance(job, _Query):
            self._start_query(job, now)
        else:
            self._start_fetch(job, now)

    def _start_query(self, q: _Query, now: float) -> None:
        q.deadline = now + self.deadline_s
        keys = q.keys
        for link in self.links.values():
            if not link.usable(now):
                continue
            if len(link.outstanding) >= self.queue_max:
                link.stats.inc("busy")
                continue
            rid = self._send(link, lambda rid: HaveReq(rid, keys))
            if rid is not None:
                link.outstanding[rid] = q
                q.waiting.add(link.endpoint)
                link.stats.inc("lookups")
        if not q.waiting:
            self._finish(q)

    def _start_fetch(self, f: _Fetch, now: float) -> None:
        f.deadline = now + self.fetch_timeout_s
        link = self.links.get(f.peer)
        if link is None or not link.usable(now):
            self._finish(f)
            return
        if len(link.outstanding) >= self.queue_max:
            link.stats.inc("busy")
            self._finish(f)
            return
        keys = f.keys
        rid = self._send(link, lambda rid: FetchReq(rid, keys))
        if rid is None:
            self._finish(f)
            return
        link.outstanding[rid] = f
        link.stats.inc("fetches")

    def _finish(self, job: _Job) -> None:
        if job.done:
            raise RuntimeError("peer job finished twice")  # programmer error
        job.done = True
        self.on_done(job)

    def _forget(self, link: _Link, job: _Job, now: float) -> None:
        """``link`` will not answer ``job`` (timeout, link gone, bad reply)."""
        if isinstance(job, _Query):
            job.waiting.discard(link.endpoint)
            if not job.waiting and not job.done:
                self._finish(job)
        elif not job.done:
            self._finish(job)

    def _expire(self, now: float) -> None:
        for link in list(self.links.values()):
            late = [rid for rid, job in link.outstanding.items() if job.deadline <= now]
            for rid in late:
                job = link.outstanding.pop(rid)
                link.fail(now, "timeouts")
                self._forget(link, job, now)

    # -- replies --------------------------------------------------------------------------
    def _recv(self, link: _Link, sock: zmq.Socket) -> None:
        for _ in range(RECV_BATCH_MAX):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_reply(link, frames)

    def _on_reply(self, link: _Link, frames: list[zmq.Frame]) -> None:
        now = self.clock()
        try:
            rep = decode_reply(frames[0].buffer)
        except ProtocolError as exc:
            log.debug("peer %s: %s", link.endpoint, exc)
            link.fail(now, "errors")
            return
        job = link.outstanding.pop(rep.rid, None)
        if job is None:
            link.stats.inc("late")  # its request already timed out: never touches a slot
            return
        if isinstance(rep, ErrorRep):
            log.debug("peer %s: error reply: %s", link.endpoint, rep.message)
            link.fail(now, "errors")
        elif rep.node == self.node_id:
            link.stats.state = "self"  # a seed that resolved to this very agent
        elif isinstance(job, _Query) and isinstance(rep, HaveRep):
            self._on_have(link, job, rep, now)
        elif isinstance(job, _Fetch) and isinstance(rep, FetchRep):
            self._on_fetched(link, job, rep, [f.buffer for f in frames[1:]], now)
        else:
            link.fail(now, "errors")
        self._forget(link, job, now)

    def _on_have(self, link: _Link, q: _Query, rep: HaveRep, now: float) -> None:
        if len(rep.states) != len(q.keys) or len(rep.sizes) != len(q.keys):
            link.fail(now, "errors")
            return
        link.ok(now - q.started)
        run = 0
        for state, size in zip(rep.states, rep.sizes):
            if state != Have.ARENA or not 0 < size <= self.recv_bytes_max:
                break
            run += 1
        link.stats.inc("hits", run)
        for key, state in zip(q.keys, rep.states):
            if state == Have.PENDING:
                q.promoting.add(key)
        link.stats.inc("pending", sum(1 for s in rep.states if s == Have.PENDING))
        if run > len(q.sizes):  # ties go to the first answer: the quicker peer
            q.best, q.sizes = link.endpoint, list(rep.sizes[:run])

    def _on_fetched(
        self, link: _Link, f: _Fetch, rep: FetchRep, payload: list[memoryview], now: float
    ) -> None:
        n = len(f.keys)
        if not (len(rep.sizes) == len(rep.checksums) == len(rep.frames) == n) or sum(
            rep.frames
        ) != len(payload):
            link.fail(now, "errors")
            return
        tokens_ok = len(rep.tokens) == n
        bad = 0
        at = 0
        for i in range(n):
            parts = payload[at : at + rep.frames[i]]
            at += rep.frames[i]
            if rep.sizes[i] == 0:
                continue  # the peer let it go since it answered: a miss, not a lie
            if not self._land(f, i, rep.sizes[i], rep.checksums[i], parts):
                bad += 1
                continue
            f.tokens[i] = list(rep.tokens[i]) if tokens_ok else []
            link.stats.inc("fetched_keys")
            link.stats.inc("bytes", f.sizes[i])
        if bad:
            link.fail(now, "corrupt")
            link.stats.inc("corrupt", bad - 1)
        else:
            link.ok(now - f.started)

    @staticmethod
    def _land(f: _Fetch, i: int, size: int, csum: int, parts: list[memoryview]) -> bool:
        """Copy one key's payload into its reserved pages, then verify it where it lies
        (pair check: the bytes a reader will see are the bytes checked)."""
        if size != f.sizes[i] or csum == 0 or not copy_into(f.slots[i], parts):
            return False
        if payload_checksum(f.slots[i]) != csum:
            return False
        f.checksums[i] = csum
        return True

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            jobs = list(self._inbox)
            self._inbox.clear()
        for link in list(self.links.values()):
            self._drop_link(link)
        for job in jobs:
            self._finish(job)
        if self._ctx is not None:
            self._ctx.term()

    def close_fds(self) -> None:
        """After join: the wake pipe (closed here, not by the thread, so no other
        thread can write into a descriptor number the kernel has reused)."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


# -- seeds ------------------------------------------------------------------------------------
def resolve_seeds(seeds: Sequence[str]) -> set[str]:
    """``tcp://HOST:PORT`` as given; ``dns:NAME:PORT`` as one endpoint per address the
    name resolves to now (a headless Service lists its pods). Blocking: resolver only."""
    out: set[str] = set()
    for seed in seeds:
        if seed.startswith("tcp://"):
            out.add(seed)
            continue
        name, _, port = seed[len("dns:") :].rpartition(":")
        try:
            infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.debug("peers: cannot resolve %s: %s", seed, exc)
            continue
        for family, *_, addr in infos:
            host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
            out.add(f"tcp://{host}:{port}")
    return out


class _Resolver(threading.Thread):
    def __init__(
        self, seeds: Sequence[str], interval_s: float, publish: Callable[[set[str]], None]
    ):
        super().__init__(name="kvnode-peers-dns", daemon=True)
        self.seeds = list(seeds)
        self.interval_s = interval_s
        self.publish = publish
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.publish(resolve_seeds(self.seeds))
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()


# -- the loop's side ----------------------------------------------------------------------------
OnEvicted = Callable[[list[Entry]], None]


class PeerManager:
    """Fetches local misses from peers. Loop thread only, except the network thread it
    owns. Shaped like the tier manager: ``on_lookup_miss`` -> PENDING, ``poll()``
    commits, ``stats()``, ``close()``."""

    def __init__(
        self,
        index: Index,
        arena: Any,
        curve: Curve | None,
        node_id: bytes,
        wake: Callable[[], None],
        seeds: Sequence[str] = (),
        deadline_ms: int = 5,
        fetch_timeout_ms: int = 2000,
        fetch_inflight_max: int = 256,
        fetch_bytes_max: int = 512 << 20,
        queue_max: int = 64,
        negative_ttl_s: float = 2.0,
        resolve_interval_s: float = 10.0,
        on_evicted: OnEvicted | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self._arena = _arena_view(arena)
        self.wake = wake
        self.fetch_inflight_max = fetch_inflight_max
        self.fetch_bytes_max = fetch_bytes_max
        self.negative_ttl_s = negative_ttl_s
        self.on_evicted = on_evicted
        self.clock = clock
        self._curve = curve
        self._pending: dict[bytes, str] = {}  # key -> "asking" | "fetching"
        self._reserved: set[bytes] = set()  # AGENT_OWNER reservations for fetches
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._outbox: deque[_Job] = deque()
        self.bytes_inflight = 0
        self._closing = False
        self.counters = dict.fromkeys(
            (
                "queries",
                "dropped",
                "no_space",
                "fetched",
                "fetched_bytes",
                "failed",
                "negative_hits",
            ),
            0,
        )
        self._net = _Network(curve, node_id, self._done, deadline_ms / 1000,
                             fetch_timeout_ms / 1000, queue_max, fetch_bytes_max, clock)  # fmt: skip
        self._net.start()
        self._resolver: _Resolver | None = None
        self._has_seeds = bool(seeds)
        if any(s.startswith("dns:") for s in seeds):
            self._resolver = _Resolver(seeds, resolve_interval_s, self._net.set_endpoints)
            self._resolver.start()
        else:
            self._net.set_endpoints(set(seeds))

    # -- network thread side ----------------------------------------------------------------
    def _done(self, job: _Job) -> None:
        self._outbox.append(job)
        try:
            self.wake()
        except Exception:  # a wake that fails only delays the next poll
            log.exception("peer manager: wake() failed")

    def reload_keys(self) -> int:
        """SIGHUP after a certificate change: read the authorized directory again (the
        server sharing this ``Curve`` admits by it at once) and re-create every link
        with the new server-key candidates. Returns the number of authorized keys."""
        if self._curve is None:
            return 0
        n = self._curve.ring.reload()
        self._net.rebuild()
        return n

    def set_seeds(self, seeds: Sequence[str]) -> None:
        """Replace ``tcp://`` endpoints at runtime (tests, SIGHUP without dns: seeds)."""
        self._has_seeds = bool(seeds)
        self._net.set_endpoints(set(seeds))

    # -- lookups -----------------------------------------------------------------------------
    def on_lookup_miss(self, keys: Sequence[bytes], parent: bytes | None = None) -> set[bytes]:
        """``keys``: a request's chunk keys from its first local miss on, in order;
        ``parent``: the key before them (None for a prompt's first chunk). Returns the
        keys a fetch is under way for (the agent answers PENDING). Never blocks."""
        if self._closing or not self._has_seeds or not keys:
            return set()
        out: set[bytes] = set()
        fresh, parents = self._fresh(keys, parent, out)
        # One batched request per peer: never more keys than a peer accepts in one.
        room = min(self.fetch_inflight_max - len(self._pending), PEER_KEYS_MAX)
        if len(fresh) > room:
            self.counters["dropped"] += len(fresh) - max(room, 0)
            fresh, parents = fresh[: max(room, 0)], parents[: max(room, 0)]
        if fresh and self._net.submit(_Query(fresh, parents)):
            self.counters["queries"] += 1
            for k in fresh:
                self._pending[k] = "asking"
            out.update(fresh)
        elif fresh:
            self.counters["dropped"] += len(fresh)
        return out

    def _fresh(
        self, keys: Sequence[bytes], parent: bytes | None, out: set[bytes]
    ) -> tuple[list[bytes], list[bytes | None]]:
        """The keys worth asking about: up to the first one no peer had lately (a chain
        is only useful as a prefix), skipping keys already under way."""
        now = self.clock()
        fresh: list[bytes] = []
        parents: list[bytes | None] = []
        prev = parent
        for k in keys:
            if k in self._pending:
                out.add(k)
            elif self._negative.get(k, 0.0) > now:
                self.counters["negative_hits"] += 1
                break
            elif self.index.contains(k):
                break  # being written or read locally: nothing to fetch
            else:
                fresh.append(k)
                parents.append(prev)
            prev = k
        return fresh, parents

    def _remember_miss(self, keys: Iterable[bytes]) -> None:
        until = self.clock() + self.negative_ttl_s
        for k in keys:
            self._negative[k] = until
            self._negative.move_to_end(k)
        while len(self._negative) > NEGATIVE_KEYS_MAX:
            self._negative.popitem(last=False)

    # -- the loop's side ------------------------------------------------------------------
    def poll(self) -> list[Fetched]:
        """Finish what the network thread is done with (loop thread only; never blocks):
        reserve pages for the best answer of each lookup, commit verified fetches. The
        chunks committed are returned for events and write-through tiers."""
        landed: list[Fetched] = []
        while self._outbox:
            job = self._outbox.popleft()
            if isinstance(job, _Query):
                self._plan(job)
            else:
                landed.extend(self._commit(job))
        return landed

    def _plan(self, q: _Query) -> None:
        for k in q.keys:
            self._pending.pop(k, None)
        f = self._reserve_prefix(q) if q.best and not self._closing else None
        if f is not None and not self._net.submit(f):
            self._abort(f.keys)
            self.counters["dropped"] += len(f.keys)
            f = None
        if f is not None:
            for k in f.keys:
                self._pending[k] = "fetching"
        # A key a peer is promoting is asked again on the next lookup; the others wait
        # out the negative TTL, so a connector polling PENDING soon sees MISS.
        taken = set(f.keys) if f is not None else set()
        self._remember_miss(k for k in q.keys if k not in taken and k not in q.promoting)

    def _reserve_prefix(self, q: _Query) -> _Fetch | None:
        keys: list[bytes] = []
        slots: list[list[memoryview]] = []
        for k, size in zip(q.keys, q.sizes):
            if self.bytes_inflight + size > self.fetch_bytes_max:
                self.counters["dropped"] += 1
                break
            e = self._reserve(k, size)
            if e is None:
                break
            keys.append(k)
            slots.append(split_extents(self._arena, e, self.index.page_bytes))
            self.bytes_inflight += size
        if not keys:
            return None
        n = len(keys)
        return _Fetch(q.best, keys, q.parents[:n], q.sizes[:n], slots, [0] * n, [[] for _ in keys])

    def _reserve(self, key: bytes, size: int) -> Entry | None:
        if self.on_evicted is None:
            status, e = self.index.reserve(key, size, AGENT_OWNER)
        else:
            leaving: list[Entry] = []
            status, e = self.index.reserve(key, size, AGENT_OWNER, leaving)
            self.on_evicted(leaving)
        if e is None:
            if int(status) != 1:  # EXISTS: someone else is writing it; not a failure
                self.counters["no_space"] += 1
            return None
        self._reserved.add(key)
        return e

    def _commit(self, f: _Fetch) -> list[Fetched]:
        landed: list[Fetched] = []
        failed: list[bytes] = []
        for i, key in enumerate(f.keys):
            self._pending.pop(key, None)
            self.bytes_inflight -= f.sizes[i]
            csum = f.checksums[i]
            if csum and int(self.index.commit(key, AGENT_OWNER, checksum=csum)) == 0:
                self._reserved.discard(key)
                landed.append(Fetched(key, f.parents[i], f.tokens[i], f.sizes[i]))
                self.counters["fetched"] += 1
                self.counters["fetched_bytes"] += f.sizes[i]
            else:
                failed.append(key)
        if failed:
            self._abort(failed)
            self.counters["failed"] += len(failed)
            self._remember_miss(failed)
        return landed

    def _abort(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            if k in self._reserved:
                self._reserved.discard(k)
                self.index.abort(k, AGENT_OWNER)

    # -- state ---------------------------------------------------------------------------------
    def pending(self, key: bytes) -> bool:
        return key in self._pending

    def busy(self) -> bool:
        """Work in flight: the loop may poll sooner (completions also call wake())."""
        return bool(self._pending or self._outbox)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["pending"] = len(self._pending)
        out["bytes_inflight"] = self.bytes_inflight
        out["negative_keys"] = len(self._negative)
        out["peers"] = self._net.snapshot()
        return out

    def close(self) -> None:
        """Stop the threads, then abort every reservation a fetch still holds. If the
        network thread does not stop in time its reservations are left alone: pages a
        thread may still write are never handed back."""
        self._closing = True
        if self._resolver is not None:
            self._resolver.stop()
            self._resolver.join(CLOSE_JOIN_S)
        self._net.stop()
        self._net.join(CLOSE_JOIN_S)
        if self._net.is_alive():
            log.error(
                "peer network thread did not stop; %d fetch reservations kept", len(self._reserved)
            )
            return
        self._net.close_fds()
        self._outbox.clear()
        self._abort(list(self._reserved))
        self._pending.clear()
        self.bytes_inflight = 0


def _arena_view(arena: Any) -> memoryview:
    """Bytes of the arena: a ``Segment`` (its mapping) or any buffer (tests)."""
    return memoryview(arena.buffer if isinstance(arena, Segment) else arena).cast("B")


def build_peers(
    cfg: Any,
    index: Index,
    arena: Any,
    wake: Callable[[], None],
    lower_has: LowerHas | None = None,
    tokens_of: TokensOf | None = None,
    on_evicted: OnEvicted | None = None,
) -> tuple[PeerServer | None, PeerManager | None]:
    """What ``cfg.peers`` turns on: a server when ``listen`` is set, a manager when
    there are seeds. Raises ConfigError for unreadable keys, PeerError for a bind."""
    p = cfg.peers
    if not p.listen and not p.seeds:
        return None, None
    curve = None if p.insecure else Curve.load(p.curve_secret_key, p.curve_authorized_dir)
    if curve is None:
        log.warning("peers: insecure mode, links are neither authenticated nor encrypted")
    node_id = new_node_id()
    server = None
    if p.listen:
        server = PeerServer(index, arena, p.listen, curve, node_id, lower_has, tokens_of,
                            p.serve_bytes_max)  # fmt: skip
    manager = None
    if p.seeds:
        manager = PeerManager(
            index, arena, curve, node_id, wake, p.seeds, p.deadline_ms, p.fetch_timeout_ms,
            p.fetch_inflight_max, p.fetch_bytes_max, p.queue_max, p.negative_ttl_s,
            p.resolve_interval_s, on_evicted,
        )  # fmt: skip
    return server, manager


__all__ = [
    "Curve",
    "Fetched",
    "KeyRing",
    "PeerManager",
    "PeerServer",
    "build_peers",
    "new_node_id",
    "resolve_seeds",
]
