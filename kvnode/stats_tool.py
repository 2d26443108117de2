"""``kvnode stats``: the agent's live figures over ZeroMQ, as a table, JSON or a
refreshing view with rates."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvnode.errors import KVNodeError


def _fetch(runtime_dir: Path, timeout_s: float) -> dict[str, Any]:
    from kvnode.ipc.client import AgentClient

    client = AgentClient(runtime_dir, name="kvnode-stats", timeout_s=timeout_s, heartbeat=False)
    try:
        return client.stats()
    finally:
        client.close()


def run_stats(runtime_dir: Path, args: argparse.Namespace) -> int:
    if args.check:
        try:
            _fetch(runtime_dir, args.timeout)
        except KVNodeError as exc:
            print(f"kvnode: agent not healthy: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.json:
        print(json.dumps(_fetch(runtime_dir, args.timeout), sort_keys=True))
        return 0
    if args.watch:
        return _watch(runtime_dir, args)
    from rich.console import Console

    Console().print(render(_fetch(runtime_dir, args.timeout), None, 0.0))
    return 0


def _watch(runtime_dir: Path, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    prev: dict[str, Any] | None = None
    t_prev = time.monotonic()
    console = Console()
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                now = time.monotonic()
                try:
                    cur = _fetch(runtime_dir, args.timeout)
                    live.update(render(cur, prev, now - t_prev), refresh=True)
                    prev, t_prev = cur, now
                except KVNodeError as exc:
                    live.update(Text(f"agent unavailable: {exc}", style="red"), refresh=True)
                    prev = None
                time.sleep(max(0.1, args.watch))
        except KeyboardInterrupt:
            return 0


def _bar(frac: float, width: int = 30) -> str:
    frac = min(max(frac, 0.0), 1.0)
    full = int(frac * width)
    return "█" * full + "░" * (width - full)


def _size(n: float) -> str:
    from kvnode.agent.config import format_size

    return format_size(n)


def render(cur: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> Any:
    """A rich renderable of one snapshot; with ``prev``, rates per second."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    c = cur["counters"]
    ar = cur["arena"]
    lookups = c["hits"] + c["misses"] + c["pending"]
    head = Text(
        f"kvnode {cur['version']}  pid {cur['pid']}  up {cur['uptime_s']:.0f}s  "
        f"clients {cur['clients']}  hit ratio "
        f"{(c['hits'] / lookups if lookups else 0.0):.1%} ({c['hits']}/{lookups} keys)"
    )
    used = ar["bytes_used"] / ar["bytes_total"] if ar["bytes_total"] else 0.0
    arena = Text(
        f"arena {_bar(used)} {_size(ar['bytes_used'])} / {_size(ar['bytes_total'])} "
        f"({used:.0%})  entries {ar['entries']}  reserved {ar['reserved']}  "
        f"pinned {ar['pinned']}  policy {ar['policy']}"
    )
    tiers = Table(title="tiers", title_justify="left")
    for col in (
        "tier",
        "entries",
        "bytes",
        "hits",
        "reads",
        "writes",
        "read",
        "written",
        "errors",
        "queue",
        "dropped",
    ):
        tiers.add_column(col, justify="right" if col != "tier" else "left")
    for name, t in cur.get("tiers", {}).items():
        fill = t.get("bytes", 0) / t["bytes_max"] if t.get("bytes_max") else 0.0
        tiers.add_row(
            name, str(t.get("entries", 0)), f"{_size(t.get('bytes', 0))} {fill:.0%}",
            str(t.get("hits", 0)), str(t.get("reads", 0)), str(t.get("writes", 0)),
            _size(t.get("read_bytes", 0)), _size(t.get("write_bytes", 0)),
            str(t.get("errors", 0)), str(t.get("queue_depth", 0)), str(t.get("dropped", 0)),
        )  # fmt: skip
    counters = Table(title="counters" + (" (per second)" if prev else ""), title_justify="left")
    counters.add_column("counter")
    counters.add_column("total", justify="right")
    if prev:
        counters.add_column("rate/s", justify="right")
    for name, value in c.items():
        row = [name, f"{value:,}"]
        if prev and dt > 0:
            rate = (value - prev["counters"].get(name, 0)) / dt
            row.append(_size(rate) + "/s" if name.startswith("bytes") else f"{rate:,.1f}")
        counters.add_row(*row)
    lat = Table(title="latency (µs)", title_justify="left")
    for col in ("op", "p50", "p90", "p99", "count"):
        lat.add_column(col, justify="right" if col != "op" else "left")
    for op, s in cur.get("latency_us", {}).items():
        lat.add_row(op, f"{s['p50']:.0f}", f"{s['p90']:.0f}", f"{s['p99']:.0f}", str(s["count"]))
    return Group(head, arena, tiers, lat, counters)
