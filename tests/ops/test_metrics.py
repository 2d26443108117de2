"""Prometheus rendering checked with prometheus_client's own parser, and the server."""

from __future__ import annotations

import http.client
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvnode.agent.metrics import CONTENT_TYPE, MetricsServer, render
from kvnode.agent.stats import COUNTERS, LATENCY_OPS
from kvnode.errors import ConfigError


def sample_stats(scale: int = 1) -> dict[str, Any]:
    tier = {
        "entries": 3 * scale, "bytes": 3 * 65536 * scale, "bytes_max": 1 << 30,
        "hits": 2 * scale, "misses": scale, "reads": 2 * scale, "writes": 3 * scale,
        "read_bytes": 1000 * scale, "write_bytes": 2000 * scale, "errors": 0,
        "queue_depth": 4, "dropped": 1, "evictions": scale,
    }  # fmt: skip
    return {
        "version": "0.1.0",
        "pid": 1234,
        "generation": 7,
        "uptime_s": 12.5,
        "clients": 2,
        "arena": {
            "bytes_total": 1 << 26,
            "bytes_used": 65536 * scale,
            "bytes_allocated": 65536 * scale,
            "page_bytes": 65536,
            "entries": scale,
            "reserved": 0,
            "pinned": 1,
            "policy": "s3fifo",
        },  # fmt: skip
        "counters": {name: i * scale for i, name in enumerate(COUNTERS)},
        "latency_us": {
            op: {"p50": 12.0, "p90": 40.5, "p99": 250.0, "count": 10 * scale} for op in LATENCY_OPS
        },
        "tiers": {"arena": dict(tier), "disk": dict(tier), "s3": dict(tier)},
        "namespaces": {
            "00" * 16: {
                "bytes": 65536 * scale,
                "bytes_max": 1 << 29,
                "entries": scale,
                "hits": scale,
                "evictions": scale,
                "quota_evictions": 0,
                "quota_refused": 0,
            },
        },  # fmt: skip
        "peers": {
            "queries": scale,
            "fetched": scale,
            "fetched_bytes": scale,
            "failed": 0,
            "dropped": 0,
            "no_space": 0,
            "peers": {
                "tcp://10.0.0.2:7470": {
                    "state": "up",
                    "lookups": scale,
                    "hits": scale,
                    "fetches": scale,
                    "fetched_keys": scale,
                    "bytes": scale,
                    "timeouts": 0,
                    "errors": 0,
                    "corrupt": 0,
                    "busy": 0,
                    "unreachable": 0,
                    "late": 0,
                }
            },
            "directory": {
                "entries": 10 * scale,
                "bytes_estimate": 2100 * scale,
                "peers_synced": 1,
                "routed": scale,
                "no_holder": scale,
                "fallback": 0,
                "fallback_limited": 0,
                "entries_dropped": 0,
                "resyncs": 0,
            },
        },
        "peers_server": {
            "served_keys": scale,
            "served_bytes": scale,
            "have_requests": scale,
            "fetch_requests": scale,
            "refused": 0,
            "admitted": 1,
            "busy": 0,
            "dropped": 0,
            "bad_frames": 0,
            "sends_inflight": 0,
            "bytes_inflight": 0,
        },
        "events": {
            "events": 10 * scale,
            "batches": scale,
            "dropped": 0,
            "send_errors": 0,
            "queued": 0,
            "seq": scale,
            "replays": 1,
            "replay_bytes": 100,
            "bad_replays": 0,
            "replay_refused": 0,
            "replay_rate_limited": 0,
            "replay_stalled": 0,
            "replay_requesters": 0,
            "replay_ring_bytes": 4096,
            "endpoint": "tcp://0.0.0.0:7471",
        },
        "lookup_index": {
            "entries": 10,
            "capacity": 1024,
            "tombstones": 1,
            "rebuilds": 0,
            "insert_refused": 3,
            "lower_mode": 2,
            "listing_entries": 40,
            "listing_capacity": 4096,
            "listing_complete": 1,
        },  # fmt: skip
        "transfers": {
            "agent": {
                "save_bytes": 4 << 20,
                "load_bytes": 8 << 20,
                "save_chunks": 1,
                "load_chunks": 2,
                "save_copy_s": 0.5,
                "load_copy_s": 0.25,
                "jobs": 3,
                "jobs_failed": 1,
                "checksum_errors": 0,
                "exports_refused": 1,
                "refused_share": 2,
                "exporting_workers": 2,
                "jobs_inflight": 0,
                "exports_polling": 1,
                "devices": {
                    "cpu": {"copy_cores_mode": "auto", "copy_cores": "1", "copy_threads": 1},
                    "cuda:GPU-1": {"staging_bytes": 64 << 20, "reserved_bytes": 96 << 20},
                    "bad": "not a mapping",
                },
            },
            "worker": {"save_bytes": 1 << 20, "load_bytes": 2 << 20},
        },  # fmt: skip
    }


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample_name: str, **labels: str) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError((sample_name, labels))


def test_render_parses_with_types() -> None:
    text = render(sample_stats())
    fams = families(text)
    # Counters: the parser names a family without "_total"; its samples keep it.
    for name in COUNTERS:
        exported = "kvnode_" + {"bytes_in": "in_bytes", "bytes_out": "out_bytes"}.get(name, name)
        assert fams[exported].type == "counter", name
        assert fams[exported].samples[0].name == exported + "_total"
    assert value(fams, "kvnode_in_bytes_total") == COUNTERS.index("bytes_in")
    for gauge in ("kvnode_clients", "kvnode_arena_capacity_bytes", "kvnode_arena_used_bytes",
                  "kvnode_tier_used_bytes", "kvnode_tier_entries", "kvnode_tier_queue_depth"):  # fmt: skip
        assert fams[gauge].type == "gauge", gauge
    assert value(fams, "kvnode_clients") == 2
    assert value(fams, "kvnode_agent_exports_polling") == 1
    assert value(fams, "kvnode_agent_device_copy_threads", device="cpu") == 1
    assert value(fams, "kvnode_agent_device_staging_bytes", device="cuda:GPU-1") == 64 << 20
    assert value(fams, "kvnode_agent_device_reserved_bytes", device="cuda:GPU-1") == 96 << 20
    assert value(fams, "kvnode_arena_capacity_bytes") == 1 << 26
    assert value(fams, "kvnode_info", version="0.1.0", policy="s3fifo") == 1
    # Every family has HELP and TYPE, exactly once.
    for name in fams:
        assert text.count(f"# TYPE {name}") == 1 or text.count(f"# TYPE {name}_total") == 1


def test_per_tier_labels() -> None:
    fams = families(render(sample_stats(scale=5)))
    for tier in ("arena", "disk", "s3"):
        assert value(fams, "kvnode_tier_hits_total", tier=tier) == 10
        assert value(fams, "kvnode_tier_misses_total", tier=tier) == 5
        assert value(fams, "kvnode_tier_evictions_total", tier=tier) == 5
        assert value(fams, "kvnode_tier_errors_total", tier=tier) == 0
        assert value(fams, "kvnode_tier_used_bytes", tier=tier) == 15 * 65536
        assert value(fams, "kvnode_tier_entries", tier=tier) == 15
        assert value(fams, "kvnode_tier_queue_depth", tier=tier) == 4
        assert value(fams, "kvnode_tier_dropped_total", tier=tier) == 1
    assert fams["kvnode_tier_read_bytes"].type == "counter"


def test_latency_summary_in_seconds() -> None:
    fams = families(render(sample_stats()))
    fam = fams["kvnode_op_latency_seconds"]
    assert fam.type == "summary"
    for op in LATENCY_OPS:
        assert value(fams, "kvnode_op_latency_seconds", op=op, quantile="0.5") == pytest.approx(
            12e-6
        )
        assert value(fams, "kvnode_op_latency_seconds", op=op, quantile="0.99") == pytest.approx(
            250e-6
        )
        assert value(fams, "kvnode_op_latency_seconds_count", op=op) == 10


def test_naming_conventions() -> None:
    text = render(sample_stats())
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("kvnode_")
        assert fam.documentation, fam.name
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name.endswith("_total")
            if "bytes" in s.name:
                assert s.name.endswith(("_bytes", "_bytes_total")), s.name


def test_escaping_and_odd_values() -> None:
    stats = {
        "version": 'v"1\\2\n',
        "tiers": {'we"ird\\tier\n': {"entries": 1, "queue-depth max": 2, "label": "text"}},
        "counters": {"errors": float("nan")},
        "latency_us": {"lookup": "not a summary"},
        "uptime_s": float("inf"),
    }
    text = render(stats)
    fams = families(text)
    assert value(fams, "kvnode_info", version='v"1\\2\n') == 1
    assert value(fams, "kvnode_tier_entries", tier='we"ird\\tier\n') == 1
    assert value(fams, "kvnode_tier_queue_depth_max", tier='we"ird\\tier\n') == 2
    assert value(fams, "kvnode_uptime_seconds") == float("inf")
    assert "label" not in text  # non-numeric figures are skipped, not mangled


def test_operating_doc_lists_every_metric() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operating.md").read_text()
    section = doc.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(kvnode_[a-z_]+)`", section))
    exported = {
        s.name.removesuffix("_count")
        for fam in text_string_to_metric_families(render(sample_stats()))
        for s in fam.samples
    }
    assert exported - documented == set(), "exported but not documented"
    assert documented - exported == set(), "documented but not exported"


def test_empty_stats_render() -> None:
    fams = families(render({}))
    assert list(fams) == ["kvnode_info"]


# --- server ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
def server() -> Iterator[tuple[MetricsServer, dict[str, Any]]]:
    state: dict[str, Any] = {"stats": sample_stats(), "calls": 0, "fail": False}

    def snapshot() -> dict[str, Any]:
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("snapshot failed")
        return state["stats"]

    srv = MetricsServer("127.0.0.1", free_port(), snapshot)
    srv.start()
    yield srv, state
    srv.stop()


def test_server_serves_fresh_snapshots(server: tuple[MetricsServer, dict[str, Any]]) -> None:
    srv, state = server
    status, ctype, body = get(srv.port)
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert value(families(body), "kvnode_tier_hits_total", tier="disk") == 2
    state["stats"] = sample_stats(scale=3)
    assert value(families(get(srv.port)[2]), "kvnode_tier_hits_total", tier="disk") == 6
    assert state["calls"] == 2
    status, _, body = get(srv.port, method="HEAD")
    assert (status, body) == (200, "")
    assert get(srv.port, "/other")[0] == 404


def test_server_survives_failing_snapshot(server: tuple[MetricsServer, dict[str, Any]]) -> None:
    srv, state = server
    state["fail"] = True
    assert get(srv.port)[0] == 503
    state["fail"] = False
    assert get(srv.port)[0] == 200


def test_concurrent_scrapes(server: tuple[MetricsServer, dict[str, Any]]) -> None:
    srv, _ = server
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(get(srv.port)[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 8


def test_port_zero_is_off() -> None:
    srv = MetricsServer("127.0.0.1", 0, dict)
    srv.start()
    assert not srv.enabled
    assert srv._thread is None  # no listener, no thread
    srv.stop()


def test_port_in_use_names_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        srv = MetricsServer("127.0.0.1", taken.getsockname()[1], dict)
        with pytest.raises(ConfigError) as info:
            srv.start()
        assert info.value.key == "metrics.port"


def test_stop_releases_the_port() -> None:
    port = free_port()
    for _ in range(2):
        srv = MetricsServer("127.0.0.1", port, dict)
        srv.start()
        assert get(port)[0] == 200
        srv.stop()
    with pytest.raises(OSError):
        get(port)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    srv = MetricsServer("::1", port, dict)
    srv.start()
    try:
        conn = http.client.HTTPConnection("::1", port, timeout=5)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 200
        conn.close()
        assert srv.url == f"http://[::1]:{port}/metrics"
    finally:
        srv.stop()


def test_lookup_index_and_disk_listing_figures() -> None:
    fams = families(render(sample_stats()))
    assert value(fams, "kvnode_lookup_index_entries") == 10
    assert value(fams, "kvnode_lookup_index_lower_mode") == 2
    assert value(fams, "kvnode_lookup_listing_entries") == 40
    assert value(fams, "kvnode_lookup_listing_complete") == 1
    assert fams["kvnode_lookup_index_insert_refused"].type == "counter"
    assert value(fams, "kvnode_lookup_index_insert_refused_total") == 3
    no_listing = sample_stats()
    del no_listing["lookup_index"]["listing_entries"]
    assert "kvnode_lookup_listing_entries" not in families(render(no_listing))


def test_idle_and_trickling_connections_are_bounded_and_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint listens on the network. Connections that send a byte and then
    nothing held a thread and a descriptor each for ever, out of the agent's own
    descriptor budget (900 of them and the agent stopped accepting its local
    clients). Past ``CONNECTIONS_MAX`` they are closed at once; the others are cut
    at ``CONNECTION_S``; a scrape is then served again."""
    from kvnode.agent import metrics as M

    monkeypatch.setattr(M, "CONNECTIONS_MAX", 4)
    monkeypatch.setattr(M, "CONNECTION_S", 2.0)
    srv = MetricsServer("127.0.0.1", free_port(), sample_stats)
    srv.start()
    conns: list[socket.socket] = []
    try:
        for _ in range(10):
            c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            c.sendall(b"G")
            conns.append(c)
            time.sleep(0.02)

        def ended(wait_s: float) -> list[socket.socket]:
            ready, _, _ = select.select(conns, [], [], wait_s)
            time.sleep(0.2)  # the others closed with them
            ready, _, _ = select.select(conns, [], [], 0)
            return ready

        assert len(ended(0.5)) == 6  # all but CONNECTIONS_MAX closed at once
        deadline = time.monotonic() + 5
        while len(ended(0.5)) < len(conns):  # the rest cut at CONNECTION_S
            assert time.monotonic() < deadline, "connections held past CONNECTION_S"
        assert get(srv.port)[0] == 200
    finally:
        for c in conns:
            c.close()
        srv.stop()
