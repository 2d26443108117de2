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
    """Remove committed, unpinned entries (all tiers). Used on checksum failure."""

    rid: Rid
    client_id: ClientId
    generation: Generation
    keys: Keys


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
]
Reply = Union[Welcome, Ok, LookupRep, SlotsRep, StatusRep, StatsRep, Error]

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
