"""S3 tier specifics against a real loopback endpoint (moto's server)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from kvnode.agent.tiers.base import SlotBuffers
from kvnode.agent.tiers.format import checksum
from kvnode.agent.tiers.s3 import S3Store
from kvnode.errors import S3Error

pytestmark = pytest.mark.s3
MiB = 1024 * 1024


def slot(data: bytes) -> SlotBuffers:
    return SlotBuffers.of(bytearray(data))


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fresh_node_finds_what_another_wrote(s3_endpoint):
    bucket = s3_endpoint.new_bucket()
    a = S3Store(bucket, s3_endpoint.client())
    v = os.urandom(300_000)
    assert a.put(key(1), slot(v), checksum(v))
    b = S3Store(bucket, s3_endpoint.client())  # knows nothing yet
    assert b.size_of(key(1)) is None and b.may_probe(key(1))
    assert b.probe(key(1)) == len(v)
    out = SlotBuffers.of(bytearray(len(v)))
    assert b.read_into(key(1), out) == checksum(v)
    assert bytes(out.views[0]) == v


def test_negative_cache_spares_repeated_probes(s3_endpoint):
    clock = Clock()
    s = S3Store(s3_endpoint.new_bucket(), s3_endpoint.client(), negative_ttl_s=5, clock=clock)
    assert s.probe(key(7)) is None
    assert not s.may_probe(key(7))
    clock.now += 6
    assert s.may_probe(key(7))


def test_multipart_above_threshold(s3_endpoint):
    s = S3Store(s3_endpoint.new_bucket(), s3_endpoint.client(), multipart_bytes=5 * MiB)
    v = os.urandom(11 * MiB)
    assert s.put(key(2), slot(v), checksum(v))
    rep = s.client.head_object(Bucket=s.bucket, Key=s.object_key(key(2)))
    assert "-" in rep["ETag"]  # a multipart ETag
    out = SlotBuffers.of(bytearray(len(v)))
    assert s.read_into(key(2), out) == checksum(v)
    assert bytes(out.views[0]) == v


def test_lz4_objects_are_smaller(s3_endpoint):
    s = S3Store(s3_endpoint.new_bucket(), s3_endpoint.client(), codec="lz4")
    v = b"abcd" * 100_000
    s.put(key(3), slot(v), checksum(v))
    rep = s.client.head_object(Bucket=s.bucket, Key=s.object_key(key(3)))
    assert rep["ContentLength"] < len(v) // 10


def test_stopped_endpoint_fails_fast_counts_and_trips(s3_private):
    clock = Clock()
    sleeps: list[float] = []
    s = S3Store(
        s3_private.new_bucket(),
        s3_private.client(timeout_s=1.0),
        retries_max=2,
        clock=clock,
        sleep=sleeps.append,
    )
    v = os.urandom(10_000)
    s.put(key(1), slot(v), checksum(v))
    s3_private.stop()
    t0 = time.monotonic()
    for i in range(3):
        with pytest.raises(S3Error):
            s.put(key(10 + i), slot(v), checksum(v))
    assert time.monotonic() - t0 < 5
    assert len(sleeps) == 6 and sleeps[1] > sleeps[0] * 0.9  # backoff between retries
    assert s.stats.snapshot()["errors"] == 3
    assert not s.healthy() and not s.may_probe(key(99))
    clock.now += 60
    assert s.healthy()


def test_a_corrupt_read_leaves_the_fleets_object_in_the_bucket(s3_endpoint):
    """What came back for a key does not match its header (a proxy that cut the
    Content-Length, another key's body, or a damaged object): the read fails and is
    counted, the key is a miss here for the negative cache's time, and the object
    stays in the bucket, the fleet's. It was deleted, so one bad response on one node
    lost a good object for every node."""
    from kvnode.errors import CorruptEntry

    bucket = s3_endpoint.new_bucket()
    raw = s3_endpoint.client()
    clock = Clock()
    a = S3Store(bucket, s3_endpoint.client(), negative_ttl_s=5, clock=clock)
    v = os.urandom(200_000)
    assert a.put(key(3), slot(v), checksum(v))
    okey = a.object_key(key(3))
    good = raw.get_object(Bucket=bucket, Key=okey)["Body"].read()
    raw.put_object(Bucket=bucket, Key=okey, Body=good[:-7])  # what a bad response looks like
    out = SlotBuffers.of(bytearray(len(v)))
    with pytest.raises(CorruptEntry):
        a.read_into(key(3), out)
    assert a.stats.snapshot()["corrupt"] == 1
    assert a.size_of(key(3)) is None and a.read_into(key(3), out) is None  # a miss here
    assert raw.head_object(Bucket=bucket, Key=okey)["ContentLength"] == len(good) - 7  # kept
    raw.put_object(Bucket=bucket, Key=okey, Body=good)  # the endpoint answers right again
    b = S3Store(bucket, s3_endpoint.client())  # another node still finds it
    assert b.probe(key(3)) == len(v) and b.read_into(key(3), out) == checksum(v)
    clock.now += 6  # and so does this one, once its negative cache lets it ask
    assert a.may_probe(key(3)) and a.probe(key(3)) == len(v)
    assert a.read_into(key(3), out) == checksum(v) and bytes(out.views[0]) == v


class _Trickle:
    """An S3 endpoint that answers a GET with a whole header and then its body one
    byte at a time, ``gap_s`` apart: every socket read well within the timeout, the
    body days away."""

    def __init__(self, gap_s: float = 0.2) -> None:
        import socket
        import threading

        self.gap_s = gap_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: Any) -> None:
        try:
            conn.recv(65536)
            n = 1 << 20
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Length: {n}\r\n\r\n".encode()
            )
            for _ in range(n):
                if self.stop.is_set():
                    break
                conn.sendall(b"\0")
                time.sleep(self.gap_s)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_body_that_trickles_ends_at_its_deadline(monkeypatch):
    """An endpoint that sends a GET's body a byte at a time held an I/O thread, the
    promotion's arena pages and the tier's health for as long as it went on (the
    read timeout bounds each socket read, not the body). The read now ends at its
    deadline, counted as a failed get, and nothing stays in flight."""
    import threading

    from kvnode.agent.tiers import s3 as S3
    from kvnode.agent.tiers.s3 import make_client

    monkeypatch.setattr(S3, "READ_SLOWEST_S", 1.0)
    server = _Trickle()
    try:
        store = S3Store("b", make_client(server.url, "us-east-1", timeout_s=2.0), retries_max=0)
        out = SlotBuffers.of(bytearray(200_000))
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(_raises(store.read_into, key(9), out)))
        t0 = time.monotonic()
        t.start()
        t.join(15)
        assert not t.is_alive(), "the read still waits on the trickle"
        assert isinstance(got[0], S3Error) and "did not arrive in time" in str(got[0]), got
        assert time.monotonic() - t0 < 10
        assert store.stats.snapshot()["errors"] >= 1 and not store._inflight
    finally:
        server.close()


def _raises(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        return exc
