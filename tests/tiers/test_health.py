"""Tier health: a frozen S3 endpoint is noticed within seconds and costs lookups
nothing; operating errors are counted every time and logged once per kind."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from kvnode.agent.cache import Cache
from kvnode.agent.config import load_config
from kvnode.agent.index import Index
from kvnode.agent.tiers.base import ERROR_LOG_EVERY_S, TierStats
from kvnode.agent.tiers.disk import FREE_RECHECK_S, DiskStore, FileSystem
from kvnode.agent.tiers.format import checksum
from kvnode.agent.tiers.manager import TierManager
from kvnode.agent.tiers.s3 import STUCK_AFTER_S, S3Store, make_client
from kvnode.errors import S3Error

PAGE = 64 * 1024
CLIENT = 7
DETECT_WITHIN_S = 5.0


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class FrozenEndpoint:
    """A loopback TCP server that accepts connections and never answers, like an S3
    endpoint frozen mid-flight. Stops by itself after ``lifetime_s``; closing the
    held connections then lets any request still waiting fail at once."""

    def __init__(self, lifetime_s: float = 30.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._deadline = time.monotonic() + lifetime_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frozen-s3", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        held = []
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            held.append(conn)  # never read from, never answered
            self.accepted += 1
        for conn in held:
            conn.close()
        self.sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Harness:
    """The agent's side of the tier manager, as few calls as the test needs."""

    def __init__(self, arena: Any, stores: dict[str, Any], **overrides: Any) -> None:
        self.arena = arena
        self.index = Index(len(arena.buffer), PAGE, "lru")
        cfg = load_config(env={}, overrides=overrides)
        self.cache = Cache(self.index, lambda c: TierManager(cfg, arena, c, lambda: None, stores))
        assert self.cache.tiers is not None
        self.tm = self.cache.tiers

    def put(self, k: bytes, data: bytes) -> None:
        st, e = self.cache.reserve(k, len(data), CLIENT)
        assert st.name == "OK" and e is not None
        pos = 0
        for off, n in e.extents(PAGE):
            self.arena.buffer[off : off + n] = data[pos : pos + n]
            pos += n
        # The commit offers the chunk to write-through tiers.
        assert self.cache.commit_many([k], CLIENT, [checksum(data)])[0].name == "OK"


def wait_unhealthy(store: S3Store, h: Harness, limit_s: float) -> float:
    t0 = time.monotonic()
    while store.healthy() and time.monotonic() - t0 < limit_s:
        h.tm.poll()
        time.sleep(0.05)
    return time.monotonic() - t0


def test_frozen_endpoint_is_unhealthy_within_5s_and_answers_no_pending(arena):
    ep = FrozenEndpoint()
    # The configured defaults: 10 s timeouts, 3 retries (about 40 s per request before).
    store = S3Store("bucket", make_client(ep.url, "us-east-1", timeout_s=10.0), retries_max=3)
    h = Harness(arena, {"s3": store}, **{"s3.write_policy": "write_through"})
    try:
        assert h.tm.on_lookup_miss(key(1))  # nothing known yet: a probe goes out, PENDING
        waited = wait_unhealthy(store, h, DETECT_WITHIN_S + 1)
        assert ep.accepted >= 1
        assert waited < DETECT_WITHIN_S, f"frozen endpoint unnoticed for {waited:.1f}s"
        # The probe still hangs, but an unhealthy tier promises nothing: MISS, recompute.
        assert not h.tm.on_lookup_miss(key(1))
        assert not h.tm.on_lookup_miss(key(2))
        # Writes are dropped and counted, never queued behind the frozen endpoint.
        h.put(key(3), os.urandom(100_000))
        s = h.tm.stats()["s3"]
        assert not s["healthy"] and s["errors"] >= 1
        assert s["dropped"] == 1 and s["queue_depth"] == 0
    finally:
        ep.stop()
        h.tm.close()


class HangingClient:
    """A boto3 stand-in whose requests wait for the test, then answer as told."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self.answer: BaseException | None = None
        self.calls = 0

    def get_object(self, **kw: Any) -> Any:
        self.calls += 1
        self.started.release()
        self.release.wait(10)
        assert self.answer is not None
        raise self.answer

    def close(self) -> None:
        pass


def client_error(code: str, status: int) -> BaseException:
    from botocore.exceptions import ClientError

    rep: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(rep, "GetObject")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stuck_request_trips_once_is_not_retried_and_an_answer_heals():
    from botocore.exceptions import ReadTimeoutError

    clock, client = Clock(), HangingClient()
    store = S3Store("b", client, retries_max=3, clock=clock, sleep=lambda s: None)
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            store.probe(key(1))
        except S3Error as exc:
            errors.append(exc)

    th = threading.Thread(target=probe)
    th.start()
    assert client.started.acquire(timeout=5)
    clock.now += STUCK_AFTER_S - 0.1
    assert store.healthy()  # slow is not stuck yet
    clock.now += 0.2
    assert not store.healthy() and not store.may_probe(key(2))
    for _ in range(50):  # asked often while down: counted once, not per call
        assert not store.healthy()
    assert store.stats.snapshot()["errors"] == 1
    client.answer = ReadTimeoutError(endpoint_url="http://x")
    client.release.set()
    th.join(5)
    assert errors and client.calls == 1  # a hung attempt is not retried
    assert store.stats.snapshot()["errors"] == 2  # the timed-out request itself
    client.answer = client_error("NoSuchKey", 404)  # the endpoint answers again
    client.release.set()
    assert store.probe(key(3)) is None
    assert store.healthy()


def test_errors_are_counted_each_time_and_logged_once_per_kind(caplog):
    clock = Clock()
    stats = TierStats("disk", clock=clock)
    with caplog.at_level(logging.WARNING, logger="kvnode.tiers"):
        for _ in range(100):
            stats.error("file system full", "ENOSPC")
        stats.error("read failed", "EIO", "corrupt")
        clock.now += ERROR_LOG_EVERY_S
        stats.error("file system full", "ENOSPC")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "99 more" in lines[2]
    snap = stats.snapshot()
    assert snap["errors"] == 102 and snap["corrupt"] == 1


class RoomFS(FileSystem):
    """Free space as the test says: the manager's view of a full disk."""

    room = 0

    def free_bytes(self, path: str) -> int:
        return self.room


def settle(h: Harness) -> None:
    end = time.monotonic() + 10
    while h.tm.pending_writes() and time.monotonic() < end:
        h.tm.poll()
        time.sleep(0.01)
    h.tm.poll()


def test_full_disk_drops_copies_then_takes_them_once_space_is_freed(arena, tmp_path):
    fs, clock = RoomFS(), Clock()
    disk = DiskStore(str(tmp_path), 64 * 1024 * 1024, fs=fs, clock=clock)
    h = Harness(arena, {"disk": disk}, **{"disk.write_policy": "write_through"})
    try:
        h.put(key(1), os.urandom(100_000))
        s = h.tm.stats()["disk"]
        assert not s["healthy"] and s["dropped"] == 1 and s["queue_depth"] == 0
        fs.room = 32 * 1024 * 1024  # another tenant freed space; no put() came since
        clock.now += FREE_RECHECK_S
        assert h.tm.stats()["disk"]["healthy"]
        h.put(key(2), os.urandom(100_000))
        settle(h)
        assert disk.size_of(key(2)) == 100_000 and disk.size_of(key(1)) is None
    finally:
        h.tm.close()
