"""The control-plane wire protocol.

Every message is one ZeroMQ frame: a version byte followed by a msgpack array whose
first element is the message's one-byte type tag (msgspec tagged, array-like structs).
Bulk KV bytes never travel here: they go through the shared-memory arena.
Requests carry ``rid`` (request id) echoed by the reply so a client can drop a late
reply to a call it already timed out.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Union

import msgspec

PROTOCOL_VERSION = 1
_VERSION_BYTE = bytes([PROTOCOL_VERSION])


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


class ErrCode(IntEnum):
    BAD_FRAME = 1
    BAD_VERSION = 2
    UNKNOWN_CLIENT = 3
    TOO_MANY_KEYS = 4
    TOO_MANY_CLIENTS = 5
    INTERNAL = 6
    SHUTTING_DOWN = 7


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    pass


# ---------------------------------------------------------------- requests
class Hello(_Msg, tag=1):
    rid: int
    name: str
    pid: int
    pid_ns: int = 0  # inode of /proc/self/ns/pid: pid liveness checks only in the same ns
    version: int = PROTOCOL_VERSION


class Heartbeat(_Msg, tag=2):
    rid: int
    client_id: int


class LookupReq(_Msg, tag=3):
    rid: int
    client_id: int
    keys: list[bytes]
    promote: bool = True  # start promotion of keys found in lower tiers


class ReserveReq(_Msg, tag=4):
    rid: int
    client_id: int
    keys: list[bytes]
    sizes: list[int]


class CommitReq(_Msg, tag=5):
    rid: int
    client_id: int
    keys: list[bytes]
    checksums: list[int]  # xxh3-64 of each payload; 0 = not given


class AbortReq(_Msg, tag=6):
    rid: int
    client_id: int
    keys: list[bytes]


class PinReq(_Msg, tag=7):
    rid: int
    client_id: int
    keys: list[bytes]


class ReleaseReq(_Msg, tag=8):
    rid: int
    client_id: int
    keys: list[bytes]


class StatsReq(_Msg, tag=9):
    rid: int


class Bye(_Msg, tag=10):
    rid: int
    client_id: int


class DropReq(_Msg, tag=11):
    """Remove committed, unpinned entries (all tiers). Used on checksum failure."""

    rid: int
    client_id: int
    keys: list[bytes]


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


class Ok(_Msg, tag=65):
    rid: int


class LookupRep(_Msg, tag=66):
    rid: int
    states: list[int]


class SlotsRep(_Msg, tag=67):
    """Reply to reserve and pin: per key a Status and, when OK, its slot."""

    rid: int
    status: list[int]
    slots: list[Union[Slot, None]]


class StatusRep(_Msg, tag=68):
    rid: int
    status: list[int]


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

_encoder = msgspec.msgpack.Encoder()
_req_decoder = msgspec.msgpack.Decoder(Request)
_rep_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: _Msg) -> bytes:
    return _VERSION_BYTE + _encoder.encode(msg)


def _split(frame: bytes | memoryview) -> memoryview:
    from kvnode.errors import ProtocolError

    if len(frame) < 2:
        raise ProtocolError("truncated frame")
    if frame[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {frame[0]} not supported (want {PROTOCOL_VERSION})")
    return memoryview(frame)[1:]


def decode_request(frame: bytes | memoryview) -> Any:
    from kvnode.errors import ProtocolError

    body = _split(frame)
    try:
        return _req_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad request: {exc}") from exc


def decode_reply(frame: bytes | memoryview) -> Any:
    from kvnode.errors import ProtocolError

    body = _split(frame)
    try:
        return _rep_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad reply: {exc}") from exc


def request_rid(frame: bytes) -> int:
    """Best-effort request id of an undecodable frame, for the error reply (0 if none)."""
    try:
        raw = msgspec.msgpack.decode(frame[1:])
        if isinstance(raw, list) and len(raw) > 1 and isinstance(raw[1], int):
            return int(raw[1])
    except Exception:
        pass
    return 0
