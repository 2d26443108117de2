"""sd_notify client against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvnode.agent import sdnotify


def _fields(payload: bytes) -> dict[str, str]:
    lines = payload.decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("up") is False
    assert sdnotify.status("x") is False
    assert sdnotify.stopping() is False
    assert sdnotify.watchdog() is False


def test_ready_carries_status_and_pid(listener: socket.socket) -> None:
    assert sdnotify.ready("serving 64MiB arena") is True
    fields = _fields(listener.recv(4096))
    assert fields == {
        "READY": "1",
        "STATUS": "serving 64MiB arena",
        "MAINPID": str(os.getpid()),
    }


def test_status_stopping_reloading(listener: socket.socket) -> None:
    sdnotify.status("prefaulting 40%")
    assert _fields(listener.recv(4096)) == {"STATUS": "prefaulting 40%"}
    sdnotify.stopping("flushing")
    assert _fields(listener.recv(4096)) == {"STOPPING": "1", "STATUS": "flushing"}
    sdnotify.reloading()
    assert _fields(listener.recv(4096)) == {"RELOADING": "1"}


def test_notify_formats_fields(listener: socket.socket) -> None:
    assert sdnotify.notify(errno=5, ready=True) is True
    assert listener.recv(4096) == b"ERRNO=5\nREADY=1\n"
    assert sdnotify.notify() is False  # nothing to say, nothing sent


def test_multiline_value_is_refused(listener: socket.socket) -> None:
    with pytest.raises(ValueError):
        sdnotify.status("two\nlines")


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"kvnode-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert _fields(sock.recv(4096))["READY"] == "1"


def test_unreachable_socket_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a form this client ignores
    assert sdnotify.ready("x") is False


def test_watchdog(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sdnotify.watchdog_interval_s() is None
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert sdnotify.watchdog_interval_s() == 1.5
    assert sdnotify.watchdog() is True
    assert listener.recv(4096) == b"WATCHDOG=1\n"
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval_s() is None
    assert sdnotify.watchdog() is False
