"""Fixtures of the agent-mode tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AgentProcess


@pytest.fixture
def big_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A real agent process with a 256 MiB arena."""
    a = AgentProcess(tmp_path / "run", cpu_bytes="256MiB").start()
    try:
        yield a
    finally:
        a.stop()
