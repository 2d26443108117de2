"""Prometheus endpoint: renders the agent's stats dict in the text exposition format.

``render(stats)`` is pure (the schema is "Stats schema" in docs/internals.md);
``MetricsServer`` serves it from a daemon thread with the standard library's
ThreadingHTTPServer, so a slow scraper never touches the agent's loop. The
``stats_fn`` it is given runs on the HTTP threads and must return a consistent snapshot.

Naming follows Prometheus: counters end in ``_total``, sizes in ``_bytes``, times are
in seconds. Latency is a summary (quantiles 0.5/0.9/0.99 over the agent's recent-sample
ring, plus the all-time ``_count``); the agent keeps no sum or buckets, so there is no
``_sum`` and no histogram.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kvnode.errors import ConfigError, KVNodeError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "kvnode_"
_UNSAFE_RE = re.compile(r"[^a-zA-Z0-9_]")

# Global counters whose exported name differs from "kvnode_<name>_total".
_COUNTER_NAMES = {"bytes_in": "in_bytes", "bytes_out": "out_bytes"}
_COUNTER_HELP = {
    "lookups": "Lookup requests.",
    "lookup_keys": "Keys asked for in lookups.",
    "hits": "Looked-up keys found committed in some tier.",
    "misses": "Looked-up keys found nowhere.",
    "pending": "Looked-up keys being promoted from a lower tier.",
    "reserves": "Reserve requests.",
    "reserve_keys": "Keys asked for in reserves.",
    "reserve_failed": "Keys whose reservation failed (no space, too large).",
    "commits": "Keys committed.",
    "aborts": "Reservations aborted by their clients.",
    "pins": "Pin requests.",
    "pin_misses": "Pins of keys not committed.",
    "releases": "Keys unpinned.",
    "drops": "Entries dropped by clients.",
    "bytes_in": "Bytes committed into the arena by clients.",
    "bytes_out": "Bytes pinned for reading by clients.",
    "evictions": "Entries evicted from the arena.",
    "reclaimed_clients": "Clients found dead and reclaimed.",
    "reclaimed_leases": "Reservations dropped because their client died.",
    "reclaimed_pins": "Pins dropped because their client died.",
    "bad_frames": "Frames that did not decode.",
    "errors": "Requests answered with an error.",
    "expired_leases": "Reservations not committed within arena.reserve_ttl_s.",
    "refused_identity": "Requests refused: the client id is not registered on that connection.",
    "refused_stale": "Requests refused: sent to an earlier agent generation.",
    "refused_commits": "Commit keys refused: not reserved by the committing client.",
    "drops_deferred": "Drops that waited for readers or copies before freeing pages.",
    "orphan_evictions": "Entries evicted after their parent chunk had left the arena.",
    "orphan_bytes": "Bytes of entries evicted after their parent chunk had left the arena.",
    "quota_refused": "Reserves refused: their namespace was at its share of the arena.",
    "tokens_in": "Tokens in the chunks clients committed (prefilled by vLLM, then stored).",
    "tokens_out": "Tokens in the chunks clients pinned to load (served instead of prefilled).",
    "refused_admin": "Operators' requests (drop, kvnode cache) refused to ordinary clients.",
    "corrupt_dropped": "Arena copies a client found corrupt, checked and dropped by the agent.",
    "corrupt_check_bytes": "Arena bytes the agent checksummed for ordinary clients' drops.",
    "corrupt_checks_skipped": "Entries of ordinary clients' drops left unchecked: the "
    "agent's budget for such checks was spent.",
    "refused_pins": "Pins refused: the client held agent.client_pins_max.",
    "refused_leases": "Reservations refused: the client held agent.client_leases_max.",
    "expired_pins": "Pins held longer than agent.pin_ttl_s, released by the agent.",
    "refused_connections": "Local connections closed by the agent: past "
    "agent.connections_per_process_max, silent without a client, or while not accepting.",
    "listener_pauses": "Times the local socket stopped accepting: agent.connections_max, "
    "agent.connections_per_s_max or the open-file limit reached.",
}
_ARENA_GAUGES = {
    "bytes_total": ("arena_capacity_bytes", "Size of the shared-memory arena."),
    "bytes_used": ("arena_used_bytes", "Arena bytes held by entries."),
    "bytes_allocated": ("arena_allocated_bytes", "Arena bytes in allocated pages."),
    "page_bytes": ("arena_page_bytes", "Arena allocation page size."),
    "entries": ("arena_entries", "Entries in the arena, any state."),
    "reserved": ("arena_reserved_entries", "Entries reserved and not yet committed."),
    "pinned": ("arena_pinned_entries", "Entries pinned by at least one reader."),
}
# Per-tier keys; anything else numeric in a tier becomes a gauge kvnode_tier_<key>.
_TIER_COUNTERS = {
    "hits": ("tier_hits_total", "Lookups served by this tier."),
    "misses": ("tier_misses_total", "Lookups this tier could not serve."),
    "reads": ("tier_reads_total", "Entries read from this tier."),
    "writes": ("tier_writes_total", "Entries written to this tier."),
    "read_bytes": ("tier_read_bytes_total", "Bytes read from this tier."),
    "write_bytes": ("tier_write_bytes_total", "Bytes written to this tier."),
    "evictions": ("tier_evictions_total", "Entries evicted from this tier."),
    "errors": ("tier_errors_total", "Operating errors in this tier (I/O, network)."),
    "dropped": ("tier_dropped_total", "Writes dropped because the tier's queue was full."),
}
_TIER_GAUGES = {
    "entries": ("tier_entries", "Entries held by this tier."),
    "bytes": ("tier_used_bytes", "Bytes held by this tier."),
    "bytes_max": ("tier_capacity_bytes", "Configured capacity of this tier."),
    "queue_depth": ("tier_queue_depth", "Operations queued for this tier."),
}


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def _format_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _metric_name(raw: str) -> str:
    """``kvnode_<raw>`` with anything outside [a-zA-Z0-9_] replaced by '_'."""
    return PREFIX + _UNSAFE_RE.sub("_", raw)


class _Families:
    """Collects samples by family so each family's HELP/TYPE is written once."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._meta: dict[str, tuple[str, str]] = {}
        self._samples: dict[str, list[str]] = {}

    def add(
        self,
        family: str,
        kind: str,
        help_text: str,
        value: Any,
        labels: Mapping[str, str] | None = None,
        suffix: str = "",
    ) -> None:
        num = _number(value)
        if num is None:
            return
        name = _metric_name(family)
        if name not in self._meta:
            self._order.append(name)
            self._meta[name] = (kind, help_text)
            self._samples[name] = []
        label_text = ""
        if labels:
            inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
            label_text = "{" + inner + "}"
        self._samples[name].append(f"{name}{suffix}{label_text} {_format_value(num)}")

    def text(self) -> str:
        out: list[str] = []
        for name in self._order:
            kind, help_text = self._meta[name]
            out.append(f"# HELP {name} {escape_help(help_text)}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(self._samples[name])
        return "\n".join(out) + "\n"


def _counter_family(name: str) -> str:
    base = _COUNTER_NAMES.get(name, name)
    if base.startswith("bytes_"):
        base = base[len("bytes_") :] + "_bytes"
    return base + "_total"


def _render_agent(f: _Families, stats: Mapping[str, Any]) -> None:
    info = {"version": str(stats.get("version", ""))}
    arena = stats.get("arena") or {}
    if "policy" in arena:
        info["policy"] = str(arena["policy"])
    f.add("info", "gauge", "Agent build and settings; always 1.", 1, info)
    f.add("generation", "gauge", "Arena generation; changes when the agent restarts.", stats.get("generation"))  # fmt: skip
    f.add("uptime_seconds", "gauge", "Seconds since the agent started.", stats.get("uptime_s"))
    f.add("clients", "gauge", "Registered clients (vLLM processes).", stats.get("clients"))
    for key, (family, help_text) in _ARENA_GAUGES.items():
        f.add(family, "gauge", help_text, arena.get(key))


def _render_counters(f: _Families, counters: Mapping[str, Any]) -> None:
    for name, value in counters.items():
        family = _counter_family(name)
        f.add(family, "counter", _COUNTER_HELP.get(name, f"Agent counter {name}."), value)


def _render_latency(f: _Families, latency: Mapping[str, Any]) -> None:
    family = "op_latency_seconds"
    help_text = "Agent-side time to serve a request, by operation (recent samples)."
    for op, summary in latency.items():
        if not isinstance(summary, Mapping):
            continue
        empty = not summary.get("count")  # no samples: NaN, as Prometheus summaries say
        for key, quantile in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):
            value = math.nan if empty else _number(summary.get(key))
            if value is not None:
                f.add(family, "summary", help_text, value / 1e6, {"op": op, "quantile": quantile})
        f.add(family, "summary", help_text, summary.get("count"), {"op": op}, suffix="_count")


def _render_tiers(f: _Families, tiers: Mapping[str, Any]) -> None:
    for tier, values in tiers.items():
        if not isinstance(values, Mapping):
            continue
        labels = {"tier": str(tier)}
        for key, value in values.items():
            if key in _TIER_COUNTERS:
                family, help_text = _TIER_COUNTERS[key]
                f.add(family, "counter", help_text, value, labels)
            elif key in _TIER_GAUGES:
                family, help_text = _TIER_GAUGES[key]
                f.add(family, "gauge", help_text, value, labels)
            else:
                f.add("tier_" + key, "gauge", f"Tier figure {key}.", value, labels)


# The shared lookup index (and the disk listing beside it): stats key -> family, help.
_INDEX_GAUGES = {
    "entries": ("lookup_index_entries", "Keys in the shared lookup index."),
    "capacity": ("lookup_index_capacity", "Slots of the shared lookup index."),
    "lower_mode": (
        "lookup_index_lower_mode",
        "What a miss in the index means: 0 certain, 1 ask the agent, 2 check the disk listing.",
    ),
    "listing_entries": ("lookup_listing_entries", "Disk keys in the lookup listing."),
    "listing_capacity": ("lookup_listing_capacity", "Slots of the disk lookup listing."),
    "listing_complete": (
        "lookup_listing_complete",
        "1 while the disk listing holds every disk key (schedulers trust its misses).",
    ),
}


def _render_lookup_index(f: _Families, index: Mapping[str, Any]) -> None:
    for key, (family, help_text) in _INDEX_GAUGES.items():
        if key in index:
            f.add(family, "gauge", help_text, index[key])
    if "insert_refused" in index:
        help_text = "Keys the shared lookup index had no room for (readers miss them)."
        f.add("lookup_index_insert_refused_total", "counter", help_text, index["insert_refused"])


# Per namespace (tenant): stats key -> family, kind, help.
_NAMESPACE_FAMILIES = {
    "bytes": ("namespace_bytes", "gauge", "Arena bytes held by the namespace's entries."),
    "bytes_max": ("namespace_limit_bytes", "gauge", "Arena bytes the namespace may hold."),
    "entries": ("namespace_entries", "gauge", "Arena entries of the namespace."),
    "hits": ("namespace_hits_total", "counter", "Pins of the namespace's entries."),
    "evictions": ("namespace_evictions_total", "counter", "The namespace's entries evicted."),
    "quota_evictions": (
        "namespace_quota_evictions_total",
        "counter",
        "Entries evicted to keep the namespace within its share.",
    ),
    "quota_refused": (
        "namespace_quota_refused_total",
        "counter",
        "Reserves refused: the namespace at its share, its own entries all in use.",
    ),
}


def _render_namespaces(f: _Families, namespaces: Mapping[str, Any]) -> None:
    for ns, values in namespaces.items():
        if not isinstance(values, Mapping):
            continue
        for key, (family, kind, help_text) in _NAMESPACE_FAMILIES.items():
            f.add(family, kind, help_text, values.get(key), {"namespace": str(ns)})


# Peers: the fetching side (this node asks), per peer and in total, and the serving side.
PEER_STATES = ("up", "connecting", "refused", "unreachable", "down", "self")  # peers/links.py
_PEER_COUNTERS = {
    "lookups": "Keys this node asked the peer about.",
    "hits": "Keys the peer said it has.",
    "fetches": "Fetch requests sent to the peer.",
    "fetched_keys": "Chunks fetched from the peer into the arena.",
    "bytes": "Bytes fetched from the peer.",
    "timeouts": "Requests to the peer that timed out.",
    "errors": "Bad or failed answers from the peer.",
    "corrupt": "Chunks from the peer that failed their checksum.",
    "busy": "Requests the peer refused as busy.",
    "unreachable": "Times the peer could not be reached.",
    "late": "Answers that came after their deadline.",
}
_PEER_TOTALS = {
    "queries": ("peer_queries_total", "Lookups fanned out to peers."),
    "fetched": ("peer_fetched_total", "Chunks fetched from any peer."),
    "fetched_bytes": ("peer_fetched_bytes_total", "Bytes fetched from any peer."),
    "failed": ("peer_fetch_failed_total", "Fetches that failed (timeout, error, checksum)."),
    "dropped": ("peer_fetch_dropped_total", "Fetches dropped: too many in flight."),
    "no_space": ("peer_fetch_no_space_total", "Fetches with no arena room to land in."),
}
_PEER_SERVER = {
    "served_keys": ("peer_served_keys_total", "counter", "Chunks sent to peers."),
    "served_bytes": ("peer_served_bytes_total", "counter", "Bytes sent to peers."),
    "have_requests": ("peer_have_requests_total", "counter", "Peers' have-you requests."),
    "fetch_requests": ("peer_fetch_requests_total", "counter", "Peers' fetch requests."),
    "refused": ("peer_refused_total", "counter", "Peer connections refused (unknown CURVE key)."),
    "admitted": ("peer_admitted_total", "counter", "Peer connections admitted (known CURVE key)."),
    "busy": ("peer_server_busy_total", "counter", "Peers' requests refused as busy."),
    "dropped": (
        "peer_server_dropped_total",
        "counter",
        "Replies not sent: the peer's queue full (it does not read) or the peer gone.",
    ),
    "bad_frames": ("peer_bad_frames_total", "counter", "Peers' frames that did not decode."),
    "sends_inflight": ("peer_sends_inflight", "gauge", "Sends to peers not yet completed."),
    "bytes_inflight": ("peer_send_inflight_bytes", "gauge", "Arena bytes pinned for sends."),
}
_DIRECTORY = {
    "entries": ("peer_directory_chunks", "gauge", "Chunks the directory places at peers."),
    "bytes_estimate": ("peer_directory_bytes", "gauge", "Estimated memory of the directory."),
    "peers_synced": ("peer_directory_streams_synced", "gauge", "Peers' event streams in sync."),
    "routed": ("peer_directory_routed_total", "counter", "Misses sent to the one holder named."),
    "no_holder": ("peer_directory_no_holder_total", "counter", "Misses no peer holds: no message."),
    "fallback": (
        "peer_directory_fallback_asks_total",
        "counter",
        "Misses asked of resyncing peers.",
    ),
    "fallback_limited": (
        "peer_directory_fallback_refused_total",
        "counter",
        "Misses not asked: over peers.fallback_asks_per_s.",
    ),
    "entries_dropped": (
        "peer_directory_dropped_total",
        "counter",
        "Announced chunks not kept: peers.directory_entries_max reached.",
    ),
    "resyncs": ("peer_directory_resyncs_total", "counter", "Peers' event streams resynced."),
}
_EVENTS = {
    "events": ("events_published_total", "counter", "KV events published."),
    "batches": ("events_batches_total", "counter", "KV event batches published."),
    "dropped": ("events_dropped_total", "counter", "KV events dropped (queue full)."),
    "send_errors": ("events_send_errors_total", "counter", "Batches the socket refused."),
    "replays": ("events_replays_total", "counter", "Replay requests accepted."),
    "replay_bytes": ("events_replay_bytes_total", "counter", "Bytes of batches replayed."),
    "bad_replays": ("events_bad_replays_total", "counter", "Replay requests that did not decode."),
    "replay_refused": (
        "events_replay_refused_total",
        "counter",
        "Replay requests refused: events.replay_requesters_max reached.",
    ),
    "replay_rate_limited": (
        "events_replay_rate_limited_total",
        "counter",
        "Replay requests over events.replay_requests_per_s.",
    ),
    "replay_stalled": (
        "events_replay_stalled_total",
        "counter",
        "Replays abandoned: unread for events.replay_stall_s.",
    ),
    "replay_requesters": ("events_replay_requesters", "gauge", "Requesters being replayed to."),
    "replay_ring_bytes": ("events_replay_ring_bytes", "gauge", "Bytes of batches kept for replay."),
    "queued": ("events_queued", "gauge", "KV events waiting for the next batch."),
    "seq": ("events_sequence", "gauge", "Sequence number of the last batch."),
}


def _render_peers(f: _Families, peers: Mapping[str, Any], server: Mapping[str, Any]) -> None:
    for key, (family, help_text) in _PEER_TOTALS.items():
        f.add(family, "counter", help_text, peers.get(key))
    for addr, p in (peers.get("peers") or {}).items():
        if not isinstance(p, Mapping):
            continue
        labels = {"peer": str(addr)}
        state = str(p.get("state", ""))
        f.add("peer_up", "gauge", "1 while the link to the peer is up.", int(state == "up"), labels)  # fmt: skip
        for st in PEER_STATES:
            f.add("peer_state", "gauge", "The link's state, one-hot: up, connecting, refused "
                  "(our CURVE key), unreachable, down (failing, skipped a while), self.", int(state == st), {**labels, "state": st})  # fmt: skip
        for key, help_text in _PEER_COUNTERS.items():
            f.add(f"peer_{key}_total", "counter", help_text, p.get(key), labels)
    for key, (family, kind, help_text) in _PEER_SERVER.items():
        f.add(family, kind, help_text, server.get(key))
    directory = peers.get("directory") or {}
    for key, (family, kind, help_text) in _DIRECTORY.items():
        f.add(family, kind, help_text, directory.get(key))


def _render_events(f: _Families, events: Mapping[str, Any]) -> None:
    for key, (family, kind, help_text) in _EVENTS.items():
        f.add(family, kind, help_text, events.get(key))


def _render_transfers(f: _Families, transfers: Mapping[str, Any]) -> None:
    """Who moved the bytes: the agent (agent mode) or the clients (worker mode)."""
    help_bytes = "Bytes moved between vLLM's KV cache and the arena, by mode and direction."
    help_chunks = "Chunks the agent moved itself (agent mode), by direction."
    for mode in ("agent", "worker"):
        part = transfers.get(mode) or {}
        for direction in ("save", "load"):
            labels = {"mode": mode, "direction": direction}
            f.add(
                "transfer_bytes_total",
                "counter",
                help_bytes,
                part.get(f"{direction}_bytes"),
                labels,
            )
    agent = transfers.get("agent") or {}
    for direction in ("save", "load"):
        labels = {"direction": direction}
        f.add(
            "agent_transfer_chunks_total",
            "counter",
            help_chunks,
            agent.get(f"{direction}_chunks"),
            labels,
        )
        help_s = "Seconds the agent's copy threads spent on jobs, by direction."
        f.add(
            "agent_copy_seconds_total", "counter", help_s, agent.get(f"{direction}_copy_s"), labels
        )
    for key, help_text in (
        ("jobs", "Save and load jobs handed to the agent."),
        ("layerwise_jobs", "Saves handed over during the forward pass, copied layer by layer."),
        ("jobs_failed", "Jobs that failed (worker gone, deadline, copy error)."),
        ("checksum_errors", "Chunks that failed their checksum before the agent loaded them."),
        ("exports_refused", "Exports the agent could not reach (the worker copies itself)."),
        (
            "refused_share",
            "Chunks of jobs refused past the client's agent.client_leases_max "
            "or agent.client_pins_max.",
        ),
    ):
        f.add(f"agent_{key}_total", "counter", help_text, agent.get(key))
    f.add(
        "agent_exporting_workers",
        "gauge",
        "Workers whose KV cache the agent moves.",
        agent.get("exporting_workers"),
    )
    f.add("agent_jobs_inflight", "gauge", "Jobs queued or copying.", agent.get("jobs_inflight"))
    devices = agent.get("devices") or {}
    for device, held in list(devices.items())[:64] if isinstance(devices, Mapping) else ():
        if not isinstance(held, Mapping):
            continue
        labels = {"device": str(device)}
        f.add(
            "agent_device_copy_threads",
            "gauge",
            "Threads a job copies with on this device now (CPU: agent.cpu_copy_threads, "
            "no more than the cores left by vLLM's bound compute threads).",
            held.get("copy_threads"),
            labels,
        )
        for key, help_text in (
            ("staging_bytes", "The agent's staging memory on this GPU."),
            ("reserved_bytes", "GPU memory the agent's allocator holds on this GPU."),
        ):
            f.add(f"agent_device_{key}", "gauge", help_text, held.get(key), labels)
    f.add(
        "agent_exports_polling",
        "gauge",
        "Exporting workers the agent cannot wake (pidfd_getfd filtered or missing): "
        "they poll their progress page on a timer.",
        agent.get("exports_polling"),
    )


def render(stats: Mapping[str, Any]) -> str:
    """The stats dict as Prometheus text format (version 0.0.4)."""
    f = _Families()
    _render_agent(f, stats)
    _render_counters(f, stats.get("counters") or {})
    _render_latency(f, stats.get("latency_us") or {})
    _render_tiers(f, stats.get("tiers") or {})
    _render_lookup_index(f, stats.get("lookup_index") or {})
    _render_namespaces(f, stats.get("namespaces") or {})
    if stats.get("peers") or stats.get("peers_server"):
        _render_peers(f, stats.get("peers") or {}, stats.get("peers_server") or {})
    _render_events(f, stats.get("events") or {})
    _render_transfers(f, stats.get("transfers") or {})
    return f.text()


# The endpoint listens on the network: a connection that sends nothing (or a byte at a
# time) held a thread and a descriptor for ever, out of the agent's own descriptor
# budget, until the agent stopped accepting its local clients. So at most
# CONNECTIONS_MAX at once (more are closed at once), each read within
# READ_TIMEOUT_S, and none kept past CONNECTION_S however it trickles.
CONNECTIONS_MAX = 32
READ_TIMEOUT_S = 10.0
CONNECTION_S = 30.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self._send(404, b"not found; try /metrics\n", "text/plain; charset=utf-8", head)
            return
        try:
            body = render(self.server.stats_fn()).encode()
        except KVNodeError as exc:  # agent busy or stopping: the scraper retries
            log.warning("metrics: no stats: %s", exc)
            self._send(503, b"stats unavailable\n", "text/plain; charset=utf-8", head)
            return
        except Exception:  # a bug must not kill the scrape thread
            log.exception("metrics: stats snapshot failed")
            self._send(503, b"stats unavailable\n", "text/plain; charset=utf-8", head)
            return
        self._send(200, body, CONTENT_TYPE, head)

    def _send(self, code: int, body: bytes, ctype: str, head: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics %s " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    stats_fn: Callable[[], Mapping[str, Any]]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._lock = threading.Lock()
        self._active: dict[Any, float] = {}  # connection -> when it was accepted

    def get_request(self) -> Any:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)  # no descriptor to accept with: wait, never spin
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = len(self._active) >= CONNECTIONS_MAX
            if not full:
                self._active[request] = time.monotonic()
        if full:
            super().shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._active.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke off or was cut: logged, never printed."""
        log.debug("metrics connection from %s ended badly", client_address, exc_info=True)

    def service_actions(self) -> None:
        """Every poll of the serving thread: cut connections held past CONNECTION_S
        (their threads wake from a blocked read and end)."""
        now = time.monotonic()
        with self._lock:
            old = [r for r, t in self._active.items() if now - t > CONNECTION_S]
        for request in old:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``render(stats_fn())`` on ``http://address:port/metrics``; port 0 is off."""

    def __init__(self, address: str, port: int, stats_fn: Callable[[], Mapping[str, Any]]) -> None:
        self.address = address
        self.port = port
        self.stats_fn = stats_fn
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.port != 0

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        if not self.enabled or self._server is not None:
            return
        cls = _Server6 if ":" in self.address else _Server
        try:
            server = cls((self.address, self.port), _Handler)
        except OSError as exc:
            raise ConfigError(
                "metrics.port", f"cannot listen on {self.address}:{self.port}: {exc}"
            ) from exc
        server.stats_fn = self.stats_fn
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="kvnode-metrics",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        log.info("metrics on %s", self.url)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


class AgentStatsSource:
    """A ``stats_fn`` that asks the agent over its own socket, as ``kvnode stats`` does.

    The agent's loop owns its state and is single-threaded; a stats request needs no
    registration, so the HTTP threads get a consistent snapshot made by the loop
    itself and never read its dictionaries while it changes them.
    """

    def __init__(self, runtime_dir: str | Path, timeout_s: float = 2.0) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._client: Any = None

    def __call__(self) -> Mapping[str, Any]:
        with self._lock:
            if self._client is None:
                from kvnode.ipc.client import AgentClient

                self._client = AgentClient(
                    self.runtime_dir, name="kvnode-metrics", timeout_s=self.timeout_s,
                    heartbeat=False,
                )  # fmt: skip
            client = self._client
        return client.stats()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
