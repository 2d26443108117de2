"""The control-plane wire protocol.

Every message is one ZeroMQ frame: a version byte followed by a msgpack array whose
first element is the message's one-byte type tag (msgspec tagged, array-like structs).
Bulk KV bytes never travel here: they go through the shared-memory arena.
Requests carry ``rid`` (request id) echoed by the reply so a client can drop a late
reply to a call it already timed out.

Every field is bounded by the schema itself (``msgspec.Meta``): keys are exactly
``KEY_BYTES`` long, integers fit their range, strings and lists have a maximum length.
A frame that breaks any bound fails to decode and gets a ``BAD_FRAME`` error; nothing a
client sends reaches a handler unchecked.

Identity: a client's requests carry the ``client_id`` and ``generation`` its ``Welcome``
gave it. The agent accepts them only from the ZeroMQ connection that said ``Hello`` and
only in that generation; a request from an earlier generation gets ``STALE_GENERATION``
(register again and remap), any other mismatch ``UNKNOWN_CLIENT``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta

from kvnode.ipc.codec import Codec

PROTOCOL_VERSION = 2

KEY_BYTES = 16  # a chunk key: 128-bit chained content hash (kvnode.connector.keys)
KEYS_MAX = 65536  # keys in one request (the agent's batch_keys_max is usually lower)
NAME_CHARS_MAX = 64
TOKENS_PER_KEY_MAX = 1 << 16
U63 = (1 << 63) - 1

Key = Annotated[bytes, Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
Keys = Annotated[list[Key], Meta(max_length=KEYS_MAX)]
Rid = Annotated[int, Meta(ge=0, le=U63)]
ClientId = Annotated[int, Meta(ge=1, le=U63)]
Generation = Annotated[int, Meta(ge=0, le=U63)]
Checksum = Annotated[int, Meta(ge=0)]  # uint64 (msgpack bounds it)
Size = Annotated[int, Meta(ge=0, le=1 << 48)]
Name = Annotated[str, Meta(max_length=NAME_CHARS_MAX)]
Tokens = Annotated[
    list[Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]], Meta(max_length=TOKENS_PER_KEY_MAX)
]


class Lookup(IntEnum):
    """Per-key lookup answers."""

    MISS = 0
    HIT = 1  # committed in the arena: pin it and read
    PENDING = 2  # in a lower tier, promotion into the arena under way


class Status(IntEnum):
    """Per-key outcomes of reserve / commit / pin."""

    OK = 0
    EXISTS = 1  # reserve: already committed or being written by someone
    NO_SPACE = 2  # reserve: arena full of pinned/reserved entries
    NOT_FOUND = 3  # pin/commit: no such entry (or not in the needed state)
    TOO_LARGE = 4  # reserve: bigger than the arena
    BAD_STATE = 5  # commit of an entry this client does not hold


# Per-key answers in replies: bounded, so a client indexes its tables without a check.
LookupState = Annotated[int, Meta(ge=0, le=int(max(Lookup)))]
StatusCode = Annotated[int, Meta(ge=0, le=int(max(Status)))]


class ErrCode(IntEnum):
    BAD_FRAME = 1
    BAD_VERSION = 2
    UNKNOWN_CLIENT = 3
    TOO_MANY_KEYS = 4
    TOO_MANY_CLIENTS = 5
    INTERNAL = 6
    SHUTTING_DOWN = 7
    STALE_GENERATION = 8  # the agent restarted since this client registered: Hello again
    UNKNOWN_EXPORT = 9  # a job names an export this client does not hold: export again
    JOB_LATE = 10  # a job reached the agent past the deadline its worker set: not run
    NOT_PERMITTED = 20  # an operator's request (drop, clear) from an ordinary client


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    pass


# ---------------------------------------------------------------- requests
class Hello(_Msg, tag=1):
    rid: Rid
    name: Name
    pid: Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]  # 0: unknown (no pid checks)
    pid_ns: Annotated[int, Meta(ge=0, le=U63)] = 0  # inode of /proc/self/ns/pid
    version: Annotated[int, Meta(ge=0, le=255)] = PROTOCOL_VERSION


class Heartbeat(_Msg, tag=2):
    rid: Rid
    client_id: ClientId
    generation: Generation


class LookupReq(_Msg, tag=3):
    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys
    promote: bool = True  # start promotion of keys found in lower tiers


class ReserveReq(_Msg, tag=4):
    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys
    sizes: Annotated[list[Size], Meta(max_length=KEYS_MAX)]
    # Optional, per key: entries that share a group (one chunk's per-rank entries under
    # tensor parallelism) are evicted and dropped together. Empty list: no groups.
    groups: Annotated[list[Key], Meta(max_length=KEYS_MAX)] = []
    # Optional: the namespace (16 bytes, the seed of the chunks' key chain) the keys
    # belong to, for per-namespace quotas and figures. Empty: none named.
    namespace: Annotated[bytes, Meta(max_length=16)] = b""


class CommitReq(_Msg, tag=5):
    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys
    checksums: Annotated[list[Checksum], Meta(max_length=KEYS_MAX)]  # 0 = not given
    # Optional, per key, for KV events: the previous chunk's key (b"" for the first
    # chunk of a prompt) and the chunk's token ids. Empty lists: not given.
    parents: Annotated[
        list[Annotated[bytes, Meta(max_length=KEY_BYTES)]], Meta(max_length=KEYS_MAX)
    ] = []
    tokens: Annotated[list[Tokens], Meta(max_length=KEYS_MAX)] = []


class AbortReq(_Msg, tag=6):
    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys


class PinReq(_Msg, tag=7):
    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys


class ReleaseReq(_Msg, tag=8):
    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys


class StatsReq(_Msg, tag=9):
    rid: Rid


class Bye(_Msg, tag=10):
    rid: Rid
    client_id: ClientId
    generation: Generation


class DropReq(_Msg, tag=11):
    """Remove committed entries from the arena and the disk (never from S3, which the
    fleet shares). An operator's request: refused with NOT_PERMITTED otherwise."""

    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys


# ---------------------------------------------------------------- agent mode
# A worker exports its KV cache once per agent generation; the agent then moves the
# bytes itself (kvnode.agent.movers). Limits below bound what one export may describe.
EXPORT_LAYERS_MAX = 1024
BLOCK_PARTS_MAX = 8  # contiguous pieces of one block of one layer (K and V halves...)
JOB_CHUNKS_MAX = 256  # chunks in one save or load job
JOB_SLOTS_MAX = 1024  # jobs a worker may have in flight (slots of its progress page)
PROBE_BYTES = 16
Addr = Annotated[int, Meta(ge=0, le=U63)]  # user-space addresses fit 63 bits
BlockIds = Annotated[list[Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]], Meta(max_length=4096)]


class LayerExport(msgspec.Struct, array_like=True, gc=False):
    """One layer of a worker's paged KV cache, as the agent must address it.

    Block ``b`` of the layer is the bytes ``base + b * block_stride + off`` for each
    ``(off, nbytes)`` of ``parts``, in that order: its payload in a chunk entry is
    those pieces back to back, at ``payload_offset + i * block_nbytes`` for the
    chunk's ``i``-th block (the same format as the worker's own copies)."""

    name: Name
    base: Addr
    num_blocks: Annotated[int, Meta(ge=1, le=(1 << 31) - 1)]
    block_stride: Annotated[int, Meta(ge=0, le=1 << 40)]
    block_nbytes: Annotated[int, Meta(ge=1, le=1 << 32)]
    parts: Annotated[
        list[tuple[Annotated[int, Meta(ge=0, le=1 << 40)], Annotated[int, Meta(ge=1, le=1 << 32)]]],
        Meta(min_length=1, max_length=BLOCK_PARTS_MAX),
    ]
    payload_offset: Size
    layout: Name = ""
    dtype: Name = ""
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=U63)]], Meta(max_length=8)] = []
    strides: Annotated[list[Annotated[int, Meta(ge=0, le=U63)]], Meta(max_length=8)] = []
    group: Annotated[int, Meta(ge=0, le=255)] = 0


class ExportReq(_Msg, tag=12):
    """The worker's KV cache and how to reach it. ``device`` "cpu": cross-memory
    attach into the process on the other end of this connection (its pid comes from
    the kernel, never from the message). ``progress`` is the worker's page of job
    slots the agent writes completions into; ``probe`` a buffer holding ``nonce``,
    which the agent reads (proving it reaches this process) and overwrites with the
    nonce reversed (proving it can write)."""

    rid: Rid
    client_id: ClientId
    generation: Generation
    device: Name
    layers: Annotated[list[LayerExport], Meta(min_length=1, max_length=EXPORT_LAYERS_MAX)]
    progress: Addr
    slots: Annotated[int, Meta(ge=1, le=JOB_SLOTS_MAX)]
    slot_bytes: Annotated[int, Meta(ge=1, le=1 << 16)]
    chunk_nbytes: Size
    probe: Addr
    nonce: Annotated[bytes, Meta(min_length=PROBE_BYTES, max_length=PROBE_BYTES)]
    handles: Annotated[list[bytes], Meta(max_length=EXPORT_LAYERS_MAX)] = []  # GPU IPC handles
    # One end of a Unix datagram socket pair the worker made (its descriptor number),
    # which the agent takes with pidfd_getfd and sends a byte on after each progress
    # write the worker may wait for: -1, or an agent that cannot take it
    # (``ExportRep.wakes`` false), and the worker polls its page on a timer.
    wake_fd: Annotated[int, Meta(ge=-1, le=1 << 30)] = -1


class JobReq(_Msg, tag=13):
    """Save (``load`` false) or load ``keys`` between the arena and the exported
    cache's ``blocks`` (per key, the chunk's block ids; a load's ``offsets`` give each
    key's first block inside the stored entry). ``slot``/``seq`` name the worker's
    progress slot the agent reports into. Saves carry groups, parents and tokens like
    a commit; a ``layerwise`` save is copied layer by layer as the worker computes."""

    rid: Rid
    client_id: ClientId
    generation: Generation
    export_id: Annotated[int, Meta(ge=1, le=U63)]
    load: bool
    slot: Annotated[int, Meta(ge=0, lt=JOB_SLOTS_MAX)]
    seq: Annotated[int, Meta(ge=1, le=255)]
    keys: Annotated[list[Key], Meta(max_length=JOB_CHUNKS_MAX)]
    blocks: Annotated[list[BlockIds], Meta(max_length=JOB_CHUNKS_MAX)]
    offsets: Annotated[
        list[Annotated[int, Meta(ge=0, le=4096)]], Meta(max_length=JOB_CHUNKS_MAX)
    ] = []
    groups: Annotated[list[Key], Meta(max_length=JOB_CHUNKS_MAX)] = []
    parents: Annotated[
        list[Annotated[bytes, Meta(max_length=KEY_BYTES)]], Meta(max_length=JOB_CHUNKS_MAX)
    ] = []
    tokens: Annotated[list[Tokens], Meta(max_length=JOB_CHUNKS_MAX)] = []
    # A save handed over while the forward pass runs: the agent copies layer i once
    # the worker has marked it computed in the job's slot (``progress.computed_byte``).
    layerwise: bool = False
    # The worker's deadline (CLOCK_MONOTONIC, ns; 0: none): the agent writes nothing
    # into the worker after it, however late the job reached it, so a worker that
    # gives the job up past it may reuse its blocks and slot. A job that arrives past
    # it is refused (``JOB_LATE``).
    deadline_ns: Annotated[int, Meta(ge=0, le=U63)] = 0


# ---------------------------------------------------------------- operators
class AdminOp(IntEnum):
    """What ``kvnode cache`` asks; every one needs an operator's connection."""

    LIST = 1  # totals per tier, then up to ``limit`` entries of ``tier`` by ``sort``
    SHOW = 2  # each of ``keys`` in every tier
    DROP = 3  # ``keys`` out of the arena and the disk
    DROP_NAMESPACE = 4  # every arena entry reserved under the namespace ``keys[0]``
    CLEAR = 5  # every entry of ``tier`` ("arena" or "disk")


ADMIN_LIST_MAX = 10_000  # entries one LIST answers with at most
ADMIN_KEYS_MAX = 1024  # keys one SHOW or DROP names at most
TierName = Annotated[str, Meta(max_length=16)]


class AdminReq(_Msg, tag=20):
    rid: Rid
    client_id: ClientId
    generation: Generation
    op: Annotated[int, Meta(ge=1, le=int(max(AdminOp)))]
    keys: Annotated[list[Key], Meta(max_length=ADMIN_KEYS_MAX)] = []
    tier: TierName = ""
    limit: Annotated[int, Meta(ge=0, le=ADMIN_LIST_MAX)] = 0
    sort: Annotated[str, Meta(max_length=8)] = "hits"


# ---------------------------------------------------------------- replies
class Slot(msgspec.Struct, array_like=True, gc=False):
    """Where an entry's bytes live in the arena: extents of (offset, length)."""

    size: int
    extents: list[tuple[int, int]]
    checksum: int = 0


class Welcome(_Msg, tag=64):
    rid: int
    client_id: int
    segment: str
    arena_bytes: int
    page_bytes: int
    generation: int  # changes on every agent start: remap on change
    heartbeat_interval_s: float
    index_segment: str = ""  # shared-memory lookup index ("" when not published)
    agent_pid: int = 0  # for the worker's consent to cross-memory attach (Yama)
    agent_pid_ns: int = 0


class Ok(_Msg, tag=65):
    rid: int


class LookupRep(_Msg, tag=66):
    rid: int
    states: list[LookupState]


class SlotsRep(_Msg, tag=67):
    """Reply to reserve and pin: per key a Status and, when OK, its slot."""

    rid: int
    status: list[StatusCode]
    slots: list[Union[Slot, None]]


class StatusRep(_Msg, tag=68):
    rid: int
    status: list[StatusCode]


class StatsRep(_Msg, tag=69):
    rid: int
    stats: dict[str, Any]


class ExportRep(_Msg, tag=70):
    """``export_id`` 0: refused, ``reason`` says why in one line (the worker then
    copies itself: worker mode)."""

    rid: int
    export_id: int
    reason: str = ""
    wakes: bool = False  # the agent holds the worker's wake socket


class AdminRep(_Msg, tag=80):
    rid: int
    result: dict[str, Any]


class Error(_Msg, tag=127):
    rid: int
    code: int
    message: str


Request = Union[
    Hello,
    Heartbeat,
    LookupReq,
    ReserveReq,
    CommitReq,
    AbortReq,
    PinReq,
    ReleaseReq,
    StatsReq,
    Bye,
    DropReq,
    ExportReq,
    JobReq,
    AdminReq,
]
Reply = Union[Welcome, Ok, LookupRep, SlotsRep, StatusRep, StatsRep, ExportRep, AdminRep, Error]

_requests = Codec(PROTOCOL_VERSION, Request, "request")
_replies = Codec(PROTOCOL_VERSION, Reply, "reply")


def encode(msg: _Msg) -> bytes:
    return _requests.encode(msg)


def decode_request(frame: bytes | memoryview) -> Any:
    """Decode one request frame. Any input at all either decodes into a request whose
    every field is within its bounds or raises ``ProtocolError``."""
    return _requests.decode(frame)


def decode_reply(frame: bytes | memoryview) -> Any:
    return _replies.decode(frame)


class _RidOnly(msgspec.Struct, array_like=True):
    tag: Any
    rid: Rid


_rid_decoder = msgspec.msgpack.Decoder(_RidOnly)


def request_rid(frame: bytes) -> int:
    """Best-effort request id of an undecodable frame, for the error reply (0 if none).
    Decodes only the first two array elements' types, so a hostile frame costs no
    more than the decode that already failed on it."""
    try:
        return _rid_decoder.decode(frame[1:]).rid
    except Exception:
        return 0
