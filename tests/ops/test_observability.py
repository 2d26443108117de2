"""The dashboard, alerts and monitors in deploy/observability: every query names only
series the agent exports (checked against the renderer with every section present,
and against a live agent's /metrics, where each panel is evaluated), the committed
dashboard is the one its source builds, and the Kubernetes objects agree with the
DaemonSet."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kvnode.agent.metrics import render
from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient, Status
from tests.conftest import REPO, AgentProcess
from tests.ops.test_metrics import sample_stats

OBS = REPO / "deploy" / "observability"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
LABELS_OF_PROMQL = {"by", "on", "group_left", "rate", "sum", "max", "count", "clamp_min", "and",
                    "instance", "job", "tier", "peer", "op", "quantile", "state", "namespace"}  # fmt: skip


def _panels() -> Any:
    spec = importlib.util.spec_from_file_location("kvnode_panels", OBS / "panels.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvnode_panels"] = mod
    spec.loader.exec_module(mod)
    return mod


def full_stats() -> dict[str, Any]:
    """Stats with every section the agent can report: tiers, peers, events, namespaces."""
    s = sample_stats(10)
    s["tiers"]["disk"]["healthy"] = True
    peer = {k: 1 for k in ("lookups", "hits", "fetches", "fetched_keys", "bytes", "timeouts",
                           "errors", "corrupt", "busy", "unreachable", "late")}  # fmt: skip
    s["peers"] = {"queries": 3, "fetched": 2, "fetched_bytes": 9, "failed": 1, "dropped": 0,
                  "no_space": 0, "peers": {"tcp://10.0.0.2:7470": {**peer, "state": "up"}}}  # fmt: skip
    s["peers_server"] = {"served_keys": 4, "served_bytes": 99, "have_requests": 1,
                         "fetch_requests": 1, "refused": 0, "admitted": 1, "busy": 0,
                         "bad_frames": 0, "sends_inflight": 0, "bytes_inflight": 0}  # fmt: skip
    s["events"] = {"events": 10, "batches": 2, "dropped": 0, "send_errors": 0, "replays": 1,
                   "queued": 0, "seq": 2}  # fmt: skip
    s["namespaces"] = {"ab" * 8: {"bytes": 1, "bytes_max": 2, "entries": 1, "hits": 1,
                                  "evictions": 0, "quota_evictions": 0, "quota_refused": 0}}  # fmt: skip
    return s


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers and ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in LABELS_OF_PROMQL}


def all_queries() -> list[str]:
    board = json.loads((OBS / "dashboard.json").read_text())
    out = [t["expr"] for p in board["panels"] for t in p["targets"]]
    rules = yaml.safe_load((OBS / "alerts.yaml").read_text())
    out += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return out


def test_dashboard_json_is_built_from_its_source() -> None:
    built = _panels().dashboard()
    assert json.loads((OBS / "dashboard.json").read_text()) == json.loads(json.dumps(built))


def test_every_query_names_exported_series() -> None:
    known = exported(render(full_stats())) | PROMETHEUS_OWN
    for expr in all_queries():
        missing = metric_names(expr) - known
        assert not missing, f"{expr}: {missing} not exported"


def test_first_panel_answers_is_it_paying_for_itself() -> None:
    first = _panels().PANELS[0]
    exprs = " ".join(t.expr for t in first.targets)
    assert "kvnode_tokens_out_total" in exprs and "kvnode_tokens_in_total" in exprs
    second = " ".join(t.expr for t in _panels().PANELS[1].targets)
    for needle in ("kvnode_tier_hits_total", "kvnode_peer_fetched_total", "kvnode_tokens_in_total"):
        assert needle in second


def test_alerts_cover_the_failures_and_operator_rules_agree() -> None:
    rules = yaml.safe_load((OBS / "alerts.yaml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == {"KvnodeAgentDown", "KvnodeTierUnhealthy", "KvnodeUnsavedEvictionsRising",
                     "KvnodePeerUnreachable", "KvnodePeerKeyRefused", "KvnodeEventsDropped",
                     "KvnodeArenaPinnedNearFull"}  # fmt: skip
    wrapped = yaml.safe_load((OBS / "prometheusrule.yaml").read_text())
    assert wrapped["kind"] == "PrometheusRule" and wrapped["spec"] == rules


def test_monitors_match_the_daemonset() -> None:
    ds = next(d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/daemonset.yaml").read_text())
              if d and d["kind"] == "DaemonSet")  # fmt: skip
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for c in ds["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}  # fmt: skip
    docs = [d for d in yaml.safe_load_all((OBS / "monitors.yaml").read_text()) if d]
    pm = next(d for d in docs if d["kind"] == "PodMonitor")
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports
    svc = next(d for d in docs if d["kind"] == "Service")
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _traffic(c: AgentClient, n: int, base: int) -> None:
    """The connector's pattern: store chunks with their tokens, look up, load some."""
    keys = [os.urandom(16) for _ in range(n)]
    for i, key in enumerate(keys):
        data = os.urandom(16384)
        ((st, slot),) = c.reserve([key], [len(data)])
        assert st == Status.OK and slot is not None
        c.write(slot, data)
        toks = list(range(base + i * 16, base + i * 16 + 16))
        assert c.commit([key], [checksum(data)], [b""], [toks]) == [Status.OK]
    c.lookup(keys + [os.urandom(16)])
    pinned = [k for k, (st, _) in zip(keys, c.pin(keys[: n // 2])) if st == Status.OK]
    c.release(pinned)


def test_panels_evaluate_against_a_live_agent(tmp_path: Path) -> None:
    mod = _panels()
    port = _port()
    args = ["--set", f"metrics.port={port}", "--set", f"disk.path={tmp_path / 'disk'}",
            "--set", "peers.insecure=true", "--set", f"peers.listen=tcp://127.0.0.1:{_port()}",
            "--set", f"peers.seeds=tcp://127.0.0.1:{_port()}",
            "--set", "events.insecure=true", "--set", f"events.endpoint=tcp://*:{_port()}",
            "--set", f"events.replay_endpoint=tcp://*:{_port()}"]  # fmt: skip
    agent = AgentProcess(tmp_path / "run", args=args).start()
    url = f"http://127.0.0.1:{port}/metrics"
    c = AgentClient(agent.runtime_dir, name="dashboard-test", timeout_s=3.0, heartbeat=False)
    try:
        _traffic(c, 8, 0)

        def scrape() -> Any:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return mod.parse_text(resp.read().decode(), time.monotonic())

        before = scrape()
        _traffic(c, 8, 1000)
        after = scrape()
        live = set(after.samples)
        ev = mod.Evaluator(before, after)
        values: dict[str, dict[Any, float]] = {}
        for p in mod.PANELS:
            for t in p.targets:
                values[f"{p.title}/{t.legend}"] = ev.eval(t.expr)
        # Namespaces appear once a client names one (the connector does); peers' per-link
        # series once a seed is known, which this agent has.
        conditional = {"kvnode_namespace_bytes"}
        assert ev.metrics_used - live - conditional == set()
        ratio = next(
            iter(
                values[
                    "Tokens served from the cache per token prefilled/served / prefilled"
                ].values()
            )
        )
        assert math.isclose(ratio, 0.5, rel_tol=1e-9)  # half of what was stored was loaded
        stored = values["Tokens/s: served by tier against prefilled/prefilled and stored"]
        assert next(iter(stored.values())) > 0
        assert values["Peers/peers known"] == {(): 1.0}
    finally:
        c.close()
        agent.stop()
