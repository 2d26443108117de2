"""Agent log lines: plain, journald and terminal forms; level changes at run time."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvnode.agent import logs

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._handler = None


def test_plain_line() -> None:
    out = io.StringIO()
    logs.setup_logging("info", stream=out)
    logging.getLogger("kvnode.agent.server").info("arena mapped: %d bytes", 4096)
    line = out.getvalue()
    assert re.fullmatch(ISO + r" INFO kvnode\.agent\.server: arena mapped: 4096 bytes\n", line)


def test_one_line_per_event_with_traceback() -> None:
    out = io.StringIO()
    logs.setup_logging("debug", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("kvnode").exception("loop failed\nsecond line")
    text = out.getvalue()
    assert text.count("\n") == 1
    assert "loop failed\\nsecond line\\nTraceback" in text
    assert "RuntimeError: boom" in text


def test_level_filters_and_reload() -> None:
    out = io.StringIO()
    logs.setup_logging("warning", stream=out)
    log = logging.getLogger("kvnode.test")
    log.info("hidden")
    assert out.getvalue() == ""
    assert logs.set_level("debug") == "warning"
    assert logs.current_level() == "debug"
    log.debug("shown")
    assert "DEBUG kvnode.test: shown" in out.getvalue()
    # Chatty libraries stay at warning even when the agent logs at debug.
    assert logging.getLogger("botocore").level == logging.WARNING
    with pytest.raises(ValueError):
        logs.set_level("verbose")


def test_setup_replaces_own_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    logs.setup_logging("info", stream=io.StringIO())
    logs.setup_logging("info", stream=io.StringIO())
    assert len(root.handlers) == before + 1


def test_journal_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stream_is_journal(stream)
        logs.setup_logging("debug", stream=stream)
        log = logging.getLogger("kvnode.agent")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
    assert path.read_text().splitlines() == [
        "<7>DEBUG kvnode.agent: d",
        "<6>INFO kvnode.agent: i",
        "<4>WARNING kvnode.agent: w",
        "<3>ERROR kvnode.agent: e",
        "<2>CRITICAL kvnode.agent: c",
    ]


def test_journal_stream_of_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # JOURNAL_STREAM inherited by a process whose stderr was redirected elsewhere.
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    with open(tmp_path / "log", "w") as stream:
        assert not logs.stream_is_journal(stream)
        logs.setup_logging("info", stream=stream)
        logging.getLogger("kvnode").info("x")
    assert re.match(ISO + " INFO", (tmp_path / "log").read_text())


def test_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            logs.setup_logging("info", stream=tty)
            logging.getLogger("kvnode").warning("careful")
            tty.flush()
            assert "\x1b[33mWARNING\x1b[0m" in os.read(master, 4096).decode()
            monkeypatch.setenv("NO_COLOR", "1")
            logs.setup_logging("info", stream=tty)
            logging.getLogger("kvnode").warning("plain")
            tty.flush()
            assert "\x1b[" not in os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)
    out = io.StringIO()
    logs.setup_logging("info", stream=out)
    logging.getLogger("kvnode").warning("to a pipe")
    assert "\x1b[" not in out.getvalue()
