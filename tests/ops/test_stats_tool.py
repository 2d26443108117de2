"""``kvnode stats``: the table fits 80x24 (peers and events included), ``--watch``
takes an optional interval and flushes each line when piped, and an agent that does
not answer is said in words."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from kvnode.cli import main
from kvnode.stats_tool import render, summary_line
from tests.conftest import KVNODE, AgentProcess
from tests.ops.test_metrics import sample_stats


def fleet_stats() -> dict[str, Any]:
    """A node with three tiers, three peers, a peer server and events."""
    s = sample_stats(1000)
    s["generation"] = 0x40B3B3FED0BD
    s["tiers"]["disk"]["healthy"] = True
    s["tiers"]["s3"]["healthy"] = False
    peer = {"state": "up", "lookups": 12345, "hits": 999, "fetched_keys": 4567,
            "bytes": 3 << 30, "timeouts": 2, "corrupt": 0}  # fmt: skip
    s["peers"] = {"peers": {
        "tcp://kvnode-agent-0.kvnode.default.svc.cluster.local:7470": dict(peer),
        "tcp://10.0.0.2:7470": {**peer, "state": "down"},
        "tcp://10.0.0.3:7470": {**peer, "state": "connecting"},
    }}  # fmt: skip
    s["peers_server"] = {"served_keys": 123456, "served_bytes": 5 << 30, "admitted": 3,
                         "refused": 1, "busy": 0, "bad_frames": 0}  # fmt: skip
    s["events"] = {"endpoint": "tcp://0.0.0.0:7471", "events": 1234567, "batches": 45678,
                   "dropped": 12, "replays": 3}  # fmt: skip
    return s


def _lines(renderable: Any, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text().rstrip("\n").split("\n")


def test_table_fits_80_by_24_with_peers_and_events() -> None:
    cur = fleet_stats()
    prev = fleet_stats()
    prev["counters"] = {k: max(0, v - 100) for k, v in cur["counters"].items()}
    lines = _lines(render(cur, prev, 1.0))
    text = "\n".join(lines)
    assert len(lines) <= 24, text
    assert max(len(x) for x in lines) <= 80, text
    assert "…" not in text, text  # nothing cut off
    for header in ("tier", "peer", "counter"):  # every column heading whole
        row = next(x for x in lines if x.startswith(header + " "))
        heads = {"tier": "dropped", "peer": "bad", "counter": "/s"}[header]
        assert row.rstrip().endswith(heads), row
    for needle in ("serving peers", "down", "connecting", "events tcp://0.0.0.0:7471",
                   "dropped 12", "DOWN", "evict_unsaved", "gen 71140563144893"):  # fmt: skip
        assert needle in text, needle


def test_summary_line_names_health() -> None:
    line = summary_line(fleet_stats(), None, 0.0)
    assert "s3=DOWN" in line and "disk=ok" in line and "peers=1/3" in line
    assert "\n" not in line


def test_watch_interval_is_optional(tmp_path: Path) -> None:
    """``--watch`` alone (as the docs show it) parses; piped, every refresh is one
    flushed line, read here while the tool still runs."""
    agent = AgentProcess(tmp_path / "run").start()
    proc = subprocess.Popen(
        [*KVNODE, "stats", "--runtime-dir", str(agent.runtime_dir), "--watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "clients=" in first and "hit_ratio=" in first, first + proc.stderr.read()
        assert proc.poll() is None  # still running: the line came out before exit
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        agent.stop()


def test_an_agent_that_does_not_answer_is_said_in_words(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "run").start()
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        r = subprocess.run(
            [*KVNODE, "stats", "--runtime-dir", str(agent.runtime_dir), "--timeout", "0.5"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
        agent.stop()
    assert r.returncode == 1
    assert f"no answer from the agent at {agent.runtime_dir}/agent.sock within 0.5 s" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_no_agent_at_all(tmp_path: Path, capsys: Any) -> None:
    assert main(["stats", "--runtime-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no agent at {tmp_path}" in err and "is it running?" in err


def test_missing_subcommands_are_named(capsys: Any) -> None:
    assert main([]) == 2
    assert "which command?" in capsys.readouterr().err
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "config show" in err and "config_command" not in err
    r = subprocess.run([sys.executable, "-m", "kvnode", "stats", "--watch", "abc"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "expected seconds" in r.stderr
