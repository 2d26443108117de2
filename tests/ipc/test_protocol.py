from __future__ import annotations

import msgspec
import pytest

from kvnode.errors import ProtocolError
from kvnode.ipc import protocol as P


def test_round_trip_every_request() -> None:
    msgs = [
        P.Hello(1, "w", 10, 5),
        P.LookupReq(2, 3, 7, [b"k" * 16], False),
        P.ReserveReq(3, 3, 7, [b"k" * 16], [100]),
        P.CommitReq(4, 3, 7, [b"k" * 16], [9], [b""], [[1, 2, 3]]),
        P.PinReq(5, 3, 7, [b"a" * 16, b"b" * 16]),
        P.StatsReq(6),
        P.Bye(8, 3, 7),
        P.Heartbeat(9, 3, 7),
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
        b"\x01" + msgspec.msgpack.encode([1, 1, "x", 1]),  # wrong version
        b"\x02" + msgspec.msgpack.encode([99, 1]),  # unknown tag
        b"\x02" + msgspec.msgpack.encode([3, 1, 2, 3]),  # truncated lookup
        b"\x02" + msgspec.msgpack.encode([3, 1, 2, 3, "not-a-list"]),  # wrong type
        b"\x02\xff\xfe\xfd",
        b"\x02\x94\x01\x05\xa2\xff\xfe\x01",  # Hello whose name is invalid UTF-8
        b"\x02" + msgspec.msgpack.encode([1, 1, "x", -1]),  # pid out of range
        b"\x02" + msgspec.msgpack.encode([1, 1, "x" * 65, 1]),  # name too long
        b"\x02" + msgspec.msgpack.encode([3, 1, 2, 3, [b""]]),  # empty key
        b"\x02" + msgspec.msgpack.encode([3, 1, 2, 3, [b"k" * 65]]),  # key too long
        b"\x02" + msgspec.msgpack.encode([3, 1, 2, 3, [b"k" * 17]]),  # not KEY_BYTES
        b"\x02" + msgspec.msgpack.encode([3, 1, 0, 3, [b"k" * 16]]),  # client id 0
        b"\x02" + msgspec.msgpack.encode([4, 1, 2, 3, [b"k" * 16], [-5]]),  # negative size
        b"\x02" + msgspec.msgpack.encode([3, 2**63, 2, 3, []]),  # rid out of range
        b"\x02\xdd\xff\xff\xff\xff",  # array claiming 4 G elements
    ],
)
def test_bad_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        P.decode_request(frame)


def test_rid_recovered_from_undecodable_frame() -> None:
    assert P.request_rid(b"\x02" + msgspec.msgpack.encode([99, 42])) == 42
    assert P.request_rid(b"\x02junk") == 0
    assert P.request_rid(b"\x02" + msgspec.msgpack.encode([99, -1])) == 0
