"""kvnode's Grafana dashboard, its source and a text rendering of it.

    python deploy/observability/panels.py build          # writes dashboard.json
    python deploy/observability/panels.py show URL [S]   # every panel from a live agent:
                                                         # two scrapes S seconds apart

The dashboard answers first "is kvnode paying for itself on this node": tokens served
from each tier (arena, disk, S3, peers) against tokens this node prefilled and stored.
Then hit ratio and bytes per tier, lookups and latency, evictions (and unsaved ones),
tier health and queues, peers and fetches, events, clients, arena use per namespace.

``show`` evaluates the panels' queries with a small evaluator of the PromQL they use
(``rate(m[5m])``, ``sum``/``max`` with ``by``, + - * /, numbers, label matchers with =),
so the dashboard can be read without Grafana; the tests use it to check every query
names only series the agent exports.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = "5m"
# Tokens per chunk as the agent saw them in commits (the connector's chunk_tokens).
TOK_PER_CHUNK = "(sum(rate(kvnode_tokens_in_total[1h])) / sum(rate(kvnode_commits_total[1h])))"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 12


def _t(expr: str, legend: str) -> Target:
    return Target(expr, legend)


def r(metric: str, by: str = "") -> str:
    """sum of a counter's rate, optionally by labels."""
    grp = f" by ({by})" if by else ""
    return f"sum{grp}(rate({metric}[{RATE}]))"


LOWER = 'tier!="arena"'  # the tiers below the arena (disk, s3)


PANELS: tuple[Panel, ...] = (
    Panel("Tokens served from the cache per token prefilled", "none", (
        _t(f"{r('kvnode_tokens_out_total')} / {r('kvnode_tokens_in_total')}", "served / prefilled"),
    ), kind="stat", width=6, description=(
        "Tokens vLLM loaded from kvnode instead of computing, per token it prefilled and "
        "stored. Above 0 kvnode is saving prefill; above 1 it serves more than it costs.")),
    Panel("Tokens/s: served by tier against prefilled", "short", (
        _t(f"{r('kvnode_tokens_in_total')}", "prefilled and stored"),
        _t(f"{r('kvnode_tokens_out_total')}", "loaded by vLLM (from the arena)"),
        _t(f"{r('kvnode_tier_hits_total{' + LOWER + '}', 'tier')} * on() group_left() "
           f"{TOK_PER_CHUNK}", "of which promoted from {{tier}}"),
        _t(f"{r('kvnode_peer_fetched_total')} * {TOK_PER_CHUNK}", "of which fetched from peers"),
    ), width=18, description=(
        "Per tier: chunks that tier answered, times the tokens per chunk seen in commits. "
        "Counts are per tensor-parallel rank's entry.")),
    Panel("Hit ratio (keys)", "percentunit", (
        _t(f"({r('kvnode_hits_total')} + {r('kvnode_pending_total')}) / "
           f"{r('kvnode_lookup_keys_total')}", "hit or pending (lower tier, peer)"),
        _t(f"{r('kvnode_hits_total')} / {r('kvnode_lookup_keys_total')}", "arena"),
    )),
    Panel("Bytes/s by tier", "Bps", (
        _t(r("kvnode_tier_read_bytes_total", "tier"), "read {{tier}}"),
        _t(r("kvnode_tier_write_bytes_total", "tier"), "written {{tier}}"),
        _t(r("kvnode_in_bytes_total"), "stored by clients"),
        _t(r("kvnode_out_bytes_total"), "loaded by clients"),
    )),
    Panel("Lookups", "ops", (
        _t(r("kvnode_lookups_total"), "lookups/s"),
        _t(r("kvnode_lookup_keys_total"), "keys/s"),
        _t(r("kvnode_misses_total"), "misses/s"),
    )),
    Panel("Agent latency p99", "s", (
        _t('max by (op) (kvnode_op_latency_seconds{quantile="0.99"})', "{{op}}"),
    )),
    Panel("Evictions", "ops", (
        _t(r("kvnode_evictions_total"), "arena evictions/s"),
        _t(r("kvnode_evict_unsaved_total"), "evicted unsaved/s"),
        _t(r("kvnode_tier_evictions_total{" + LOWER + "}", "tier"), "{{tier}} evictions/s"),
    ), description="Unsaved: evicted from the arena before a write-back tier had a copy."),
    Panel("Tier health and queues", "short", (
        _t("max by (tier) (kvnode_tier_healthy)", "healthy {{tier}}"),
        _t("max by (tier) (kvnode_tier_queue_depth{" + LOWER + "})", "queue {{tier}}"),
        _t(r("kvnode_tier_dropped_total{" + LOWER + "}", "tier"), "dropped/s {{tier}}"),
        _t(r("kvnode_tier_errors_total{" + LOWER + "}", "tier"), "errors/s {{tier}}"),
    )),
    Panel("Peers", "short", (
        _t("sum(kvnode_peer_up)", "peers up"),
        _t("count(kvnode_peer_up)", "peers known"),
        _t(r("kvnode_peer_fetched_total"), "chunks fetched/s"),
        _t(r("kvnode_peer_fetch_failed_total"), "fetches failed/s"),
        _t(r("kvnode_peer_served_keys_total"), "chunks served to peers/s"),
        _t(r("kvnode_peer_refused_total"), "refused keys/s"),
    )),
    Panel("Peer fetch bytes/s", "Bps", (
        _t(r("kvnode_peer_bytes_total", "peer"), "{{peer}}"),
    )),
    Panel("KV events", "short", (
        _t(r("kvnode_events_published_total"), "published/s"),
        _t(r("kvnode_events_dropped_total"), "dropped/s"),
        _t(r("kvnode_events_replays_total"), "replays/s"),
    )),
    Panel("Clients", "short", (_t("sum(kvnode_clients)", "clients"),)),
    Panel("Arena use", "bytes", (
        _t("sum(kvnode_arena_used_bytes)", "used"),
        _t("sum(kvnode_arena_capacity_bytes)", "capacity"),
        _t("sum by (namespace) (kvnode_namespace_bytes)", "{{namespace}}"),
    )),
    Panel("Arena pinned and reserved", "short", (
        _t("sum(kvnode_arena_pinned_entries)", "pinned"),
        _t("sum(kvnode_arena_reserved_entries)", "reserved"),
        _t("sum(kvnode_arena_entries)", "entries"),
    )),
)  # fmt: skip


# -- the Grafana JSON --------------------------------------------------------------------
def dashboard() -> dict[str, object]:
    panels = []
    x = y = 0
    for i, p in enumerate(PANELS):
        if x + p.width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": i + 1, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [
                {"refId": chr(65 + j), "expr": _scoped(t.expr), "legendFormat": t.legend}
                for j, t in enumerate(p.targets)
            ],
        })  # fmt: skip
        x += p.width
    return {
        "title": "kvnode", "uid": "kvnode-node", "schemaVersion": 39, "version": 1,
        "tags": ["kvnode", "vllm", "kv-cache"], "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            {"name": "instance", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": "label_values(kvnode_info, instance)", "includeAll": True, "multi": True},
        ]},
        "panels": panels,
    }  # fmt: skip


def _scoped(expr: str) -> str:
    """Every selector limited to the chosen instances (Grafana's $instance variable)."""
    scope = 'instance=~"$instance"'
    return re.sub(r"\b(kvnode_[a-z_]+)(\{([^}]*)\})?(?=[\[\s)*/+-]|$)",
                  lambda m: m.group(1) + "{" + _join(m.group(3), scope) + "}", expr)  # fmt: skip


def _join(a: str | None, b: str) -> str:
    return f"{a},{b}" if a else b


# -- a small evaluator of the PromQL above -------------------------------------------------
Labels = tuple[tuple[str, str], ...]
Vector = dict[Labels, float]
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([a-zA-Z_:][a-zA-Z0-9_:]*)|(\{[^}]*\})|(\[\w+\])|(.))")


@dataclass
class Scrape:
    samples: dict[str, Vector] = field(default_factory=dict)
    t: float = 0.0


def parse_text(text: str, t: float) -> Scrape:
    out = Scrape(t=t)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if m is None:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or "")))
        out.samples.setdefault(m.group(1), {})[labels] = float(m.group(4))
    return out


class Evaluator:
    """Evaluates the dashboard's queries over two scrapes (``rate`` is their slope)."""

    def __init__(self, before: Scrape, after: Scrape) -> None:
        self.a, self.b = before, after
        self.metrics_used: set[str] = set()

    def eval(self, expr: str) -> Vector:
        self.toks = [t for t in _tokens(expr)]
        self.i = 0
        v = self._sum()
        if self.i != len(self.toks):
            raise ValueError(f"unexpected {self.toks[self.i]!r} in {expr!r}")
        return v

    def _peek(self) -> str:
        return self.toks[self.i] if self.i < len(self.toks) else ""

    def _take(self, want: str | None = None) -> str:
        tok = self._peek()
        if want is not None and tok != want:
            raise ValueError(f"expected {want!r}, got {tok!r}")
        self.i += 1
        return tok

    def _sum(self) -> Vector:
        v = self._product()
        while self._peek() in ("+", "-"):
            op = self._take()
            v = _binop(v, self._product(), op)
        return v

    def _product(self) -> Vector:
        v = self._atom()
        while self._peek() in ("*", "/"):
            op = self._take()
            if self._peek() == "on":  # "on() group_left()": one side is a single series
                for word in ("on", "(", ")", "group_left", "(", ")"):
                    self._take(word)
            v = _binop(v, self._atom(), op)
        return v

    def _atom(self) -> Vector:
        tok = self._take()
        if tok == "(":
            v = self._sum()
            self._take(")")
            return v
        if re.fullmatch(r"\d+(\.\d+)?", tok):
            return {(): float(tok)}
        if tok in ("sum", "max", "count"):
            by: list[str] = []
            if self._peek() == "by":
                self._take()
                self._take("(")
                while self._peek() != ")":
                    by.append(self._take().strip(","))
                self._take(")")
            self._take("(")
            inner = self._sum()
            self._take(")")
            return _aggregate(tok, inner, [b for b in by if b])
        if tok == "rate":
            self._take("(")
            name, match = self._selector(self._take())
            self._take()  # the range: two scrapes stand for it
            self._take(")")
            return self._rate(name, match)
        name, match = self._selector(tok)
        return self._select(self.b, name, match)

    def _selector(self, name: str) -> tuple[str, dict[str, str]]:
        match: dict[str, str] = {}
        if self._peek().startswith("{"):
            for label, op, value in re.findall(r'(\w+)\s*(!=|=)\s*"([^"]*)"', self._take()):
                match[label] = ("!" if op == "!=" else "=") + value
        self.metrics_used.add(name)
        return name, match

    def _select(self, s: Scrape, name: str, match: dict[str, str]) -> Vector:
        def ok(labels: Labels) -> bool:
            have = dict(labels)
            return all((have.get(k) == v[1:]) == (v[0] == "=") for k, v in match.items())

        return {k: v for k, v in s.samples.get(name, {}).items() if ok(k)}

    def _rate(self, name: str, match: dict[str, str]) -> Vector:
        a, b = self._select(self.a, name, match), self._select(self.b, name, match)
        dt = max(self.b.t - self.a.t, 1e-9)
        return {k: max(0.0, v - a.get(k, v)) / dt for k, v in b.items()}


def _tokens(expr: str) -> Iterator[str]:
    for m in _TOKEN.finditer(expr):
        tok = next(g for g in m.groups() if g is not None)
        if tok.strip():
            yield tok


def _aggregate(op: str, v: Vector, by: list[str]) -> Vector:
    groups: dict[Labels, list[float]] = {}
    for labels, value in v.items():
        key = tuple((k, val) for k, val in labels if k in by)
        groups.setdefault(key, []).append(value)
    fn = {"sum": sum, "max": max, "count": len}[op]
    return {k: float(fn(vals)) for k, vals in groups.items()}  # type: ignore[operator]


def _binop(a: Vector, b: Vector, op: str) -> Vector:
    def f(x: float, y: float) -> float:
        if op == "/":
            return x / y if y else float("nan")
        return {"+": x + y, "-": x - y, "*": x * y}[op]

    if len(b) == 1 and () in b:  # a vector and a single unlabelled series
        return {k: f(x, b[()]) for k, x in a.items()}
    if len(a) == 1 and () in a:
        return {k: f(a[()], y) for k, y in b.items()}
    return {k: f(a[k], b[k]) for k in a if k in b}


def show(url: str, interval_s: float = 5.0) -> str:
    """Every panel's current values from the agent's /metrics, as text."""

    def scrape() -> Scrape:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return parse_text(resp.read().decode(), time.monotonic())

    first = scrape()
    time.sleep(interval_s)
    ev = Evaluator(first, scrape())
    lines = []
    for p in PANELS:
        lines.append(f"== {p.title} [{p.unit}]")
        for t in p.targets:
            for labels, value in sorted(ev.eval(t.expr).items()):
                legend = _legend(t.legend, dict(labels))
                lines.append(f"   {legend:<34} {value:.4g}")
    return "\n".join(lines)


def _legend(text: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{(\w+)\}\}", lambda m: labels.get(m.group(1), "?"), text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        (HERE / "dashboard.json").write_text(json.dumps(dashboard(), indent=2) + "\n")
        return 0
    if argv[:1] == ["show"] and len(argv) >= 2:
        print(show(argv[1], float(argv[2]) if len(argv) > 2 else 5.0))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
