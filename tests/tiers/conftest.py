"""Fixtures for the tier tests: an anonymous page-aligned arena, a loopback S3 endpoint
(moto's server, a real HTTP endpoint), and one factory per tier store so the
conformance suite runs against each."""

from __future__ import annotations

import mmap
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvnode.agent.tiers.disk import DiskStore
from kvnode.agent.tiers.memory import MemoryStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Arena:
    """What the tier manager needs of the agent's arena: ``buffer``."""

    buffer: mmap.mmap


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena(mmap.mmap(-1, 8 * 1024 * 1024))
    yield a


class S3Endpoint:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    def start(self) -> None:
        self.server.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def client(self, timeout_s: float = 5.0) -> Any:
        from kvnode.agent.tiers.s3 import make_client

        return make_client(self.url, "us-east-1", timeout_s=timeout_s)

    def new_bucket(self) -> str:
        name = f"kvnode-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session", autouse=True)
def _s3_credentials() -> None:
    # moto accepts any credentials; the standard chain finds these in the environment.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    ep = S3Endpoint()
    ep.start()
    yield ep
    ep.stop()


@pytest.fixture
def s3_private() -> Iterator[S3Endpoint]:
    """An endpoint of the test's own, which the test may stop."""
    ep = S3Endpoint()
    ep.start()
    yield ep
    ep.stop()


# -- one factory per store, plus raw access to what it stored (for tampering) -----------
@dataclass
class StoreKit:
    name: str
    make: Callable[[], Any]  # a new store over the same backing data
    get_raw: Callable[[bytes], bytes]
    set_raw: Callable[[bytes, bytes], None]


def memory_kit() -> StoreKit:
    store = MemoryStore(64 * 1024 * 1024)

    def set_raw(key: bytes, data: bytes) -> None:
        store.blobs[key] = bytearray(data)

    return StoreKit("memory", lambda: store, lambda k: bytes(store.blobs[k]), set_raw)


def disk_kit(path: Path, **kw: Any) -> StoreKit:
    holder: dict[str, DiskStore] = {}

    def make() -> DiskStore:
        holder["s"] = DiskStore(str(path), 64 * 1024 * 1024, **kw)
        return holder["s"]

    def set_raw(key: bytes, data: bytes) -> None:
        Path(holder["s"].path_of(key)).write_bytes(data)

    return StoreKit("disk", make, lambda k: Path(holder["s"].path_of(k)).read_bytes(), set_raw)


def s3_kit(ep: S3Endpoint, **kw: Any) -> StoreKit:
    from kvnode.agent.tiers.s3 import S3Store

    bucket = ep.new_bucket()
    raw = ep.client()

    def make() -> S3Store:
        return S3Store(bucket, ep.client(), prefix="t/", **kw)

    def get_raw(key: bytes) -> bytes:
        return raw.get_object(Bucket=bucket, Key=f"t/{key.hex()}")["Body"].read()

    def set_raw(key: bytes, data: bytes) -> None:
        raw.put_object(Bucket=bucket, Key=f"t/{key.hex()}", Body=data)

    return StoreKit("s3", make, get_raw, set_raw)


@pytest.fixture(params=["memory", "disk", "disk-direct", "s3", "s3-lz4"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> StoreKit:
    name = request.param
    if name == "memory":
        return memory_kit()
    if name == "disk":
        return disk_kit(tmp_path / "disk")
    if name == "disk-direct":
        return disk_kit(tmp_path / "disk", o_direct=True)
    ep = request.getfixturevalue("s3_endpoint")
    return s3_kit(ep, codec="lz4" if name == "s3-lz4" else "none")
