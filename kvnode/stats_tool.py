"""``kvnode stats``: the agent's live figures over ZeroMQ, as a table, JSON, or a view
that refreshes (``--watch``).

The table fits an 80x24 terminal: one line each for the agent, the arena, events and
the peer server, one row per tier and per peer, and the few counters an operator acts
on. Piped (not a terminal), ``--watch`` prints one line per refresh and flushes it, so
``kvnode stats --watch | tee`` shows each refresh as it happens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvnode.errors import KVNodeError

WIDTH = 80
# Counters shown with their rate in the live view, in this order.
KEY_COUNTERS = ("lookup_keys", "hits", "pending", "commits", "evictions", "evict_unsaved",
                "bytes_in", "bytes_out", "reserve_failed", "errors")  # fmt: skip


class NoAnswer(KVNodeError):
    """The agent did not answer ``kvnode stats`` (absent, stopped or overloaded)."""


def fetch(runtime_dir: Path, timeout_s: float) -> dict[str, Any]:
    """The agent's stats; ``NoAnswer`` in words an operator acts on."""
    from kvnode.ipc.client import AgentClient

    sock = runtime_dir / "agent.sock"
    if not sock.exists():
        raise NoAnswer(f"no agent at {runtime_dir} ({sock} does not exist: is it running?)")
    client = AgentClient(runtime_dir, name="kvnode-stats", timeout_s=timeout_s, heartbeat=False)
    try:
        return client.stats()
    except KVNodeError as exc:
        raise NoAnswer(
            f"no answer from the agent at {sock} within {timeout_s:g} s ({exc})"
        ) from None
    finally:
        client.close()


def run_stats(runtime_dir: Path, args: argparse.Namespace) -> int:
    if args.check:
        try:
            fetch(runtime_dir, args.timeout)
        except KVNodeError as exc:
            print(f"kvnode: agent not healthy: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.json:
        print(json.dumps(fetch(runtime_dir, args.timeout), sort_keys=True))
        return 0
    if args.watch:
        if sys.stdout.isatty():
            return _watch(runtime_dir, args)
        return _watch_lines(runtime_dir, args)
    from rich.console import Console

    Console(width=max(WIDTH, _term_width())).print(render(fetch(runtime_dir, args.timeout)))
    return 0


def _term_width() -> int:
    import shutil

    return shutil.get_terminal_size((WIDTH, 24)).columns


def _watch(runtime_dir: Path, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    prev: dict[str, Any] | None = None
    t_prev = time.monotonic()
    console = Console()
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                now = time.monotonic()
                try:
                    cur = fetch(runtime_dir, args.timeout)
                    live.update(render(cur, prev, now - t_prev), refresh=True)
                    prev, t_prev = cur, now
                except KVNodeError as exc:
                    live.update(Text(str(exc), style="red"), refresh=True)
                    prev = None
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _watch_lines(runtime_dir: Path, args: argparse.Namespace) -> int:
    prev: dict[str, Any] | None = None
    t_prev = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            try:
                cur = fetch(runtime_dir, args.timeout)
                line = summary_line(cur, prev, now - t_prev)
                prev, t_prev = cur, now
            except KVNodeError as exc:
                line, prev = f"{time.strftime('%H:%M:%S')} {exc}", None
            print(line, flush=True)
            time.sleep(args.watch)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0


def _size(n: float) -> str:
    from kvnode.agent.config import format_size

    return format_size(n)


def _rate(cur: dict[str, Any], prev: dict[str, Any] | None, dt: float, name: str) -> float:
    if prev is None or dt <= 0:
        return 0.0
    return max(0.0, (cur["counters"].get(name, 0) - prev["counters"].get(name, 0)) / dt)


def hit_ratio(c: dict[str, Any]) -> float:
    """Keys found in the arena per key looked up (pending ones, being promoted or asked
    of peers, are not counted as hits: they may still miss)."""
    keys = c.get("hits", 0) + c.get("misses", 0) + c.get("pending", 0)
    return c.get("hits", 0) / keys if keys else 0.0


def summary_line(cur: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> str:
    """One refresh as one line (for pipes and logs)."""
    c, ar = cur["counters"], cur["arena"]
    used = ar["bytes_used"] / ar["bytes_total"] if ar["bytes_total"] else 0.0
    parts = [
        time.strftime("%H:%M:%S"),
        f"clients={cur['clients']}",
        f"arena={used:.0%}",
        f"hit_ratio={hit_ratio(c):.3f}",
        f"lookup_keys/s={_rate(cur, prev, dt, 'lookup_keys'):.1f}",
        f"commits/s={_rate(cur, prev, dt, 'commits'):.1f}",
        f"evict_unsaved={c.get('evict_unsaved', 0)}",
    ]
    for name, t in (cur.get("tiers") or {}).items():
        if name != "arena":
            parts.append(f"{name}={'ok' if t.get('healthy', 1) else 'DOWN'}")
    peers = ((cur.get("peers") or {}).get("peers") or {}).values()
    if peers:
        up = sum(1 for p in peers if p.get("state") == "up")
        parts.append(f"peers={up}/{len(peers)}")
    if cur.get("events"):
        parts.append(f"events_dropped={cur['events'].get('dropped', 0)}")
    return " ".join(parts)


def render(cur: dict[str, Any], prev: dict[str, Any] | None = None, dt: float = 0.0) -> Any:
    """A rich renderable of one snapshot, at most 80 columns; with ``prev``, rates."""
    from rich.console import Group

    parts: list[Any] = [_head(cur), _arena(cur)]
    parts.append(_tiers(cur))
    peers = _peers(cur)
    if peers is not None:
        parts.append(peers)
    parts.extend(_fleet_lines(cur))
    parts.append(_counters(cur, prev, dt))
    return Group(*parts)


PEER_ROWS_MAX = 4  # more peers are summed up in one line


def _head(cur: dict[str, Any]) -> Any:
    from rich.text import Text

    c = cur["counters"]
    lat = (cur.get("latency_us") or {}).get("lookup") or {}
    p99 = f"{lat['p99']:.0f}µs" if lat.get("count") else "-"
    return Text(
        f"kvnode {cur['version']} pid {cur['pid']} up {_duration(cur['uptime_s'])} "
        f"gen {cur['generation']} clients {cur['clients']}\n"
        f"arena hit ratio {hit_ratio(c):.1%} of {c.get('lookup_keys', 0):,} keys looked up, "
        f"lookup p99 {p99}"
    )


def _duration(s: float) -> str:
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m" if s < 86400 else f"{s // 86400}d{s % 86400 // 3600}h"
    )


def short(n: float) -> str:
    """A size in at most 5 characters: 977K, 1.9G, 188M."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if abs(n) >= 10 or unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.0f}P"


def _bar(frac: float, width: int = 16) -> str:
    frac = min(max(frac, 0.0), 1.0)
    full = int(frac * width)
    return "█" * full + "░" * (width - full)


def _arena(cur: dict[str, Any]) -> Any:
    from rich.text import Text

    ar = cur["arena"]
    used = ar["bytes_used"] / ar["bytes_total"] if ar["bytes_total"] else 0.0
    return Text(
        f"arena {_bar(used)} {short(ar['bytes_used'])}/{short(ar['bytes_total'])} "
        f"{used:.0%}  entries {ar['entries']} pinned {ar['pinned']} "
        f"reserved {ar['reserved']} {ar['policy']}"
    )


def _table(cols: tuple[str, ...]) -> Any:
    from rich.table import Table

    t = Table(box=None, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False)
    for i, col in enumerate(cols):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=True, min_width=len(col))
    return t


def _tiers(cur: dict[str, Any]) -> Any:
    t = _table(("tier", "state", "entries", "used", "fill", "hits", "read", "written",
                "errors", "queue", "dropped"))  # fmt: skip
    for name, v in (cur.get("tiers") or {}).items():
        fill = f"{v.get('bytes', 0) / v['bytes_max']:.0%}" if v.get("bytes_max") else "-"
        state = "ok" if v.get("healthy", 1) else "DOWN"
        t.add_row(
            name, state, str(v.get("entries", 0)), short(v.get("bytes", 0)), fill,
            str(v.get("hits", 0)), short(v.get("read_bytes", 0)), short(v.get("write_bytes", 0)),
            str(v.get("errors", 0)), str(v.get("queue_depth", 0)), str(v.get("dropped", 0)),
        )  # fmt: skip
    return t


def _peers(cur: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.text import Text

    peers = (cur.get("peers") or {}).get("peers") or {}
    if not peers:
        return None
    t = _table(("peer", "state", "lookups", "hits", "fetched", "bytes", "timeouts", "bad"))
    rows = sorted(peers.items())
    for addr, p in rows[:PEER_ROWS_MAX]:
        name = addr.removeprefix("tcp://")
        name = name if len(name) <= 20 else "~" + name[-19:]
        t.add_row(
            name, str(p.get("state", "?")), str(p.get("lookups", 0)), str(p.get("hits", 0)),
            str(p.get("fetched_keys", 0)), short(p.get("bytes", 0)), str(p.get("timeouts", 0)),
            str(p.get("corrupt", 0)),
        )  # fmt: skip
    if len(rows) <= PEER_ROWS_MAX:
        return t
    states: dict[str, int] = {}
    for _, p in rows[PEER_ROWS_MAX:]:
        states[str(p.get("state", "?"))] = states.get(str(p.get("state", "?")), 0) + 1
    more = ", ".join(f"{n} {st}" for st, n in sorted(states.items()))
    return Group(t, Text(f"... {len(rows) - PEER_ROWS_MAX} more peers: {more}"))


def _fleet_lines(cur: dict[str, Any]) -> list[Any]:
    from rich.text import Text

    out = []
    srv = cur.get("peers_server")
    if srv:
        out.append(Text(
            f"serving peers: {srv.get('served_keys', 0)} keys {short(srv.get('served_bytes', 0))}"
            f", admitted {srv.get('admitted', 0)} refused {srv.get('refused', 0)}"
            f" busy {srv.get('busy', 0)} bad {srv.get('bad_frames', 0)}"
        ))  # fmt: skip
    ev = cur.get("events")
    if ev:
        out.append(Text(
            f"events {ev.get('endpoint', '')}: {ev.get('events', 0)} sent, "
            f"dropped {ev.get('dropped', 0)}, replays {ev.get('replays', 0)}"
        ))  # fmt: skip
    return out


def _counters(cur: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> Any:
    """The counters an operator acts on, two to a row, with rates when known."""
    c = cur["counters"]
    t = _table(("counter", "total", "/s", "counter", "total", "/s"))
    cells: list[tuple[str, str, str]] = []
    for name in KEY_COUNTERS:
        if name not in c:
            continue
        total, rate = c[name], _rate(cur, prev, dt, name)
        if name.startswith("bytes"):
            cells.append((name, short(total), short(rate) if prev else "-"))
        else:
            cells.append((name, f"{total:,}", f"{rate:,.1f}" if prev else "-"))
    for i in range(0, len(cells), 2):
        right = cells[i + 1] if i + 1 < len(cells) else ("", "", "")
        t.add_row(*cells[i], *right)
    return t
