"""Agent logging: one line per event, on stderr, readable by people and by journald.

Outside journald a line is ``2025-01-31T12:00:00.123+00:00 INFO kvnode.agent: text``.
Under systemd (``JOURNAL_STREAM`` names our stderr) journald stamps each line itself,
so the timestamp is left out and a ``<N>`` syslog priority prefix lets ``journalctl -p``
filter by level. Colour only when the stream is a terminal and ``NO_COLOR`` is unset.
Newlines inside a message (tracebacks) are escaped so one event stays one line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_COLOUR = {logging.DEBUG: "2", logging.INFO: "32", logging.WARNING: "33", logging.ERROR: "31"}
# Libraries that are chatty at debug; they stay at warning unless asked for by name.
_QUIET = ("botocore", "boto3", "s3transfer", "urllib3", "asyncio")

_handler: logging.Handler | None = None


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)") from None


def _priority(levelno: int) -> int:
    """syslog priorities (sd-daemon.h): <2> crit, <3> err, <4> warning, <6> info, <7> debug."""
    if levelno >= logging.ERROR:
        return 2 if levelno >= logging.CRITICAL else 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def stream_is_journal(stream: IO[str]) -> bool:
    """True when ``JOURNAL_STREAM`` ("dev:inode") is the file behind ``stream``."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True  # no descriptor to compare (tests, wrappers): trust the variable
    return value == f"{st.st_dev}:{st.st_ino}"


class LineFormatter(logging.Formatter):
    def __init__(self, journal: bool, colour: bool) -> None:
        super().__init__()
        self.journal = journal
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{record.stack_info}"
        text = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
        level = record.levelname
        if self.colour:
            level = f"\x1b[{_COLOUR.get(record.levelno, '0')}m{level}\x1b[0m"
        if self.journal:
            return f"<{_priority(record.levelno)}>{level} {record.name}: {text}"
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
            timespec="milliseconds"
        )
        return f"{ts} {level} {record.name}: {text}"


def setup_logging(
    level: str | int = "info", stream: IO[str] | None = None, journal: bool | None = None
) -> logging.Handler:
    """Install the agent's handler on the root logger (replacing an earlier one)."""
    global _handler
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = stream_is_journal(stream)
    isatty = getattr(stream, "isatty", None)
    colour = bool(isatty and isatty()) and not journal and "NO_COLOR" not in os.environ
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journal=journal, colour=colour))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    set_level(level)
    return handler


def set_level(level: str | int) -> str:
    """Change the level at run time (SIGHUP); returns the previous level's name."""
    levelno = parse_level(level)
    root = logging.getLogger()
    previous = logging.getLevelName(root.level).lower()
    root.setLevel(levelno)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))
    return previous


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()


class Throttled:
    """A log line any local client can cause at will (a refused request, say): the
    first goes out at once, then at most one every ``every_s``, each saying how many
    were held back before it. The counters count every one."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None
        self._held = 0

    def due(self) -> int | None:
        """None: hold this line back; else log it, saying how many were held back."""
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held

    @staticmethod
    def note(held: int) -> str:
        return f" ({held} more since the last such line)" if held else ""
