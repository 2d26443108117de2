"""The peer wire format: messages between agents of a fleet, and their bounds.

A peer frame is the shared codec's (``kvnode.ipc.codec``): a version byte and one
msgspec struct; every field is bounded by its schema, so a frame that decodes is within
limits. A ``FetchRep`` is followed by payload frames (the chunks' bytes, zero-copy out of
the sender's arena); their checksums are the writers', never computed by the sender.
"""

from __future__ import annotations

import os
from typing import Annotated, Union

import msgspec
from msgspec import Meta

from kvnode.ipc.codec import Codec

PEER_PROTOCOL_VERSION = 1
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
    STORED = 3  # on the peer's disk: fetchable now (read from there when asked)


class PeerMsg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    pass


class HaveReq(PeerMsg, tag=1):
    rid: _Rid
    keys: _Keys


class FetchReq(PeerMsg, tag=2):
    rid: _Rid
    keys: _Keys


class InfoReq(PeerMsg, tag=3):
    """Where is your KV-event stream? (asked by a directory subscriber)"""

    rid: _Rid


class HaveRep(PeerMsg, tag=64):
    rid: _Rid
    node: _Node
    states: _Sizes  # Have.* per key
    sizes: _Sizes  # payload bytes per key (0 unless ARENA)


class FetchRep(PeerMsg, tag=65):
    """Followed by ``sum(frames)`` payload frames, key by key in request order. A key
    the sender no longer holds (or will not send now) has size 0 and no frames."""

    rid: _Rid
    node: _Node
    sizes: _Sizes
    checksums: _Ints  # xxh3-64 of each payload, never 0 for a sent key
    frames: _Sizes  # payload frames per key
    tokens: Annotated[list[_Tokens], Meta(max_length=PEER_KEYS_MAX)] = []  # [] = not known


class InfoRep(PeerMsg, tag=66):
    """The ports of this agent's event PUB and replay sockets on the host the asker
    reached it at (0: none on tcp), and its generation (``node``): a new one means the
    agent restarted and everything it announced before is gone."""

    rid: _Rid
    node: _Node
    events_port: Annotated[int, Meta(ge=0, le=65535)] = 0
    replay_port: Annotated[int, Meta(ge=0, le=65535)] = 0


class ErrorRep(PeerMsg, tag=127):
    rid: _Rid
    message: Annotated[str, Meta(max_length=256)]


PeerRequest = Union[HaveReq, FetchReq, InfoReq]
PeerReply = Union[HaveRep, FetchRep, InfoRep, ErrorRep]
_requests = Codec(PEER_PROTOCOL_VERSION, PeerRequest, "peer request")
_replies = Codec(PEER_PROTOCOL_VERSION, PeerReply, "peer reply")


def encode(msg: PeerMsg) -> bytes:
    return _requests.encode(msg)


def decode_request(frame: bytes | memoryview) -> HaveReq | FetchReq | InfoReq:
    """Any bytes at all: a bounded request, or ``ProtocolError``."""
    return _requests.decode(frame)  # type: ignore[no-any-return]


def decode_reply(frame: bytes | memoryview) -> HaveRep | FetchRep | InfoRep | ErrorRep:
    return _replies.decode(frame)  # type: ignore[no-any-return]


def new_node_id() -> bytes:
    """This agent generation's id: a reply carrying our own id means the seed list
    (a headless Service lists every pod) led us to ourselves."""
    return os.urandom(NODE_ID_BYTES)


__all__ = [
    "PEER_KEYS_MAX",
    "PEER_PROTOCOL_VERSION",
    "REQUEST_BYTES_MAX",
    "ZAP_DOMAIN",
    "ErrorRep",
    "FetchRep",
    "FetchReq",
    "Have",
    "HaveRep",
    "HaveReq",
    "InfoRep",
    "InfoReq",
    "decode_reply",
    "decode_request",
    "encode",
    "new_node_id",
]
