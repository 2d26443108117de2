"""A minimal sd_notify client: tells systemd (Type=notify) how the agent is doing.

The service manager passes a datagram socket path in ``NOTIFY_SOCKET``; a leading
``@`` means the Linux abstract namespace. When the variable is unset (a shell, a
container without systemd) every function here does nothing, so callers never check.
Send failures are swallowed: a missing supervisor must not stop the agent.
"""

from __future__ import annotations

import os
import socket

_ENV_SOCKET = "NOTIFY_SOCKET"
_ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
_ENV_WATCHDOG_PID = "WATCHDOG_PID"


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other forms are not used by this agent


def _encode(fields: dict[str, object]) -> bytes:
    lines = []
    for name, value in fields.items():
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify field {name} must be one line")
        lines.append(f"{name.upper()}={text}")
    return ("\n".join(lines) + "\n").encode()


def notify(**fields: object) -> bool:
    """Send ``NAME=value`` lines (names upper-cased); returns True if a datagram left."""
    raw = os.environ.get(_ENV_SOCKET, "")
    addr = _address(raw) if raw else None
    if addr is None or not fields:
        return False
    payload = _encode(fields)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, addr)
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    """The agent serves: arena mapped and socket bound."""
    if status:
        return notify(ready=1, status=status, mainpid=os.getpid())
    return notify(ready=1, mainpid=os.getpid())


def stopping(status: str = "") -> bool:
    if status:
        return notify(stopping=1, status=status)
    return notify(stopping=1)


def reloading(status: str = "") -> bool:
    if status:
        return notify(reloading=1, status=status)
    return notify(reloading=1)


def status(text: str) -> bool:
    return notify(status=text)


def watchdog_interval_s() -> float | None:
    """Seconds between keep-alives to send (half the configured timeout), or None."""
    usec = os.environ.get(_ENV_WATCHDOG_USEC, "")
    pid = os.environ.get(_ENV_WATCHDOG_PID, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. our parent)
    return int(usec) / 2e6


def watchdog() -> bool:
    """Keep-alive ping; only sent when systemd set a watchdog for this process."""
    if watchdog_interval_s() is None:
        return False
    return notify(watchdog=1)
