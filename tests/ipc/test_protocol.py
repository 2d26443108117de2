from __future__ import annotations

import msgspec
import pytest

from kvnode.errors import ProtocolError
from kvnode.ipc import protocol as P


def test_round_trip_every_request() -> None:
    msgs = [
        P.Hello(1, "w", 10, 5),
        P.LookupReq(2, 3, [b"k" * 16], False),
        P.ReserveReq(3, 3, [b"k" * 16], [100]),
        P.CommitReq(4, 3, [b"k" * 16], [9]),
        P.PinReq(5, 3, [b"a" * 16, b"b" * 16]),
        P.StatsReq(6),
    ]
    for m in msgs:
        assert P.decode_request(P.encode(m)) == m


def test_reply_with_optional_slots() -> None:
    rep = P.SlotsRep(7, [0, 3], [P.Slot(10, [(0, 10)], 4), None])
    assert P.decode_reply(P.encode(rep)) == rep


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01",
        b"\x02" + msgspec.msgpack.encode([1, 1, "x", 1]),  # wrong version
        b"\x01" + msgspec.msgpack.encode([99, 1]),  # unknown tag
        b"\x01" + msgspec.msgpack.encode([3, 1, 2]),  # truncated lookup
        b"\x01" + msgspec.msgpack.encode([3, 1, 2, "not-a-list"]),  # wrong type
        b"\x01\xff\xfe\xfd",
    ],
)
def test_bad_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        P.decode_request(frame)


def test_rid_recovered_from_undecodable_frame() -> None:
    assert P.request_rid(b"\x01" + msgspec.msgpack.encode([99, 42])) == 42
    assert P.request_rid(b"\x01junk") == 0
