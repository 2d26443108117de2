"""Kubernetes manifests: schema-valid (offline schemas from kubernetes-validate, strict
mode refuses unknown fields) and consistent with the agent's configuration."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvnode.agent import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# 1.29: native sidecars (init containers with restartPolicy: Always) are on by default.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
OVERHEAD_BYTES = 512 * 1024**2
KV_TRANSFER = json.loads((ROOT / "deploy" / "vllm" / "kv-transfer-config.json").read_text())
ENV_NAMES = {
    f"KVNODE_{s.upper()}_{f.name.upper()}" for s in cfgmod.SECTIONS for f in cfgmod._fields(s)
}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in docs(p) if d["kind"] == kind]


def quantity(text: str | int) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert m, text
    mult = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # fmt: skip
    return int(m.group(1)) * mult[m.group(2)]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def agent_container(spec: dict[str, Any]) -> dict[str, Any]:
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c.get("command", [])[:2] == ["kvnode", "agent"]:
            return c
    raise AssertionError("no agent container")


def vllm_container(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c.get("command", [""])[0] == "vllm")


def agent_config(doc: dict[str, Any], tmp_path: Path) -> cfgmod.Config:
    """The agent's effective config: its ConfigMap's agent.toml plus its KVNODE_* env."""
    spec = pod_spec(doc)
    cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
    cm = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == cm_name)
    path = tmp_path / f"{cm_name}.toml"
    path.write_text(cm["data"]["agent.toml"])
    env = {e["name"]: e["value"] for e in agent_container(spec).get("env", [])}
    return cfgmod.load_config(str(path), env=env)


def workloads() -> list[dict[str, Any]]:
    return [d for d in by_kind("DaemonSet") + by_kind("Deployment")]


def agent_workloads() -> list[dict[str, Any]]:
    out = []
    for d in workloads():
        try:
            agent_container(pod_spec(d))
        except AssertionError:
            continue
        out.append(d)
    return out


def test_there_is_something_to_check() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"daemonset.yaml", "sidecar.yaml"} <= names
    assert len(agent_workloads()) == 2


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_schema_valid(path: Path, version: str) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_rejects_broken_manifests() -> None:
    """Negative controls: the validation above does refuse bad manifests."""
    ds = next(d for d in by_kind("DaemonSet"))
    version = VERSIONS[-1]
    broken = copy.deepcopy(ds)
    del broken["spec"]["selector"]  # required
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    broken = copy.deepcopy(ds)
    pod_spec(broken)["containers"][0]["volumeMount"] = []  # misspelt: strict refuses
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    broken = copy.deepcopy(ds)
    pod_spec(broken)["terminationGracePeriodSeconds"] = "thirty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    broken = copy.deepcopy(ds)
    broken["apiVersion"] = "extensions/v1beta1"  # long gone
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(broken, version, strict=True)


@pytest.mark.parametrize("doc", agent_workloads(), ids=lambda d: d["kind"])
def test_agent_sizing_and_shutdown(doc: dict[str, Any], tmp_path: Path) -> None:
    cfg = agent_config(doc, tmp_path)
    spec = pod_spec(doc)
    agent = agent_container(spec)
    assert cfg.sources["arena.cpu_bytes"] == "env:KVNODE_ARENA_CPU_BYTES"
    for env in agent.get("env", []):
        assert env["name"] in ENV_NAMES, f"{env['name']} is no config key"
    mem = agent["resources"]
    assert quantity(mem["requests"]["memory"]) >= cfg.arena.cpu_bytes + OVERHEAD_BYTES
    assert quantity(mem["limits"]["memory"]) >= quantity(mem["requests"]["memory"])
    assert spec["terminationGracePeriodSeconds"] > cfg.agent.shutdown_flush_s
    assert str(cfg.runtime_dir) == "/run/kvnode"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert agent[probe]["exec"]["command"] == ["kvnode", "stats", "--check"], probe
    sc = agent["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert cfg.metrics.port in {p["containerPort"] for p in agent["ports"]}


@pytest.mark.parametrize("doc", agent_workloads(), ids=lambda d: d["kind"])
def test_vllm_shares_socket_and_shm_with_group(doc: dict[str, Any], tmp_path: Path) -> None:
    cfg = agent_config(doc, tmp_path)
    if doc["kind"] == "DaemonSet":
        # The vLLM side lives in its own manifest and reaches the host paths.
        client = next(d for d in docs(ROOT / "deploy/kubernetes/vllm-node-client.yaml"))
        agent_spec, client_spec = pod_spec(doc), pod_spec(client)
        assert not agent_spec.get("hostIPC") and not client_spec.get("hostIPC")
        for spec, container in ((agent_spec, agent_container(agent_spec)),
                                (client_spec, vllm_container(client_spec))):  # fmt: skip
            vols = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: vols[m["name"]] for m in container["volumeMounts"]}
            assert mounts["/dev/shm"]["hostPath"]["path"] == "/dev/shm"
            assert mounts["/run/kvnode"]["hostPath"]["path"] == "/run/kvnode"
        groups = client_spec["securityContext"]["supplementalGroups"]
    else:
        spec = pod_spec(doc)
        vols = {v["name"]: v for v in spec["volumes"]}
        agent, vllm = agent_container(spec), vllm_container(spec)
        assert agent.get("restartPolicy") == "Always"  # native sidecar: up before vLLM
        # The agent refuses a root-owned, world-writable emptyDir as its runtime
        # directory: the shared volume is its parent, the agent creates the directory.
        assert str(cfg.runtime_dir.parent) == "/run"
        for path in ("/dev/shm", "/run"):
            a = next(m["name"] for m in agent["volumeMounts"] if m["mountPath"] == path)
            v = next(m["name"] for m in vllm["volumeMounts"] if m["mountPath"] == path)
            assert a == v, f"{path} is not shared"
            assert vols[a]["emptyDir"]["medium"] == "Memory"
        shm = next(m["name"] for m in agent["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert quantity(vols[shm]["emptyDir"]["sizeLimit"]) > cfg.arena.cpu_bytes
        groups = [spec["securityContext"]["fsGroup"]]
    assert cfg.agent.group and int(cfg.agent.group) in groups


@pytest.mark.parametrize("doc", [d for d in workloads() if any(
    c.get("command", [""])[0] == "vllm" for c in pod_spec(d)["containers"])],
    ids=lambda d: d["metadata"]["name"])  # fmt: skip
def test_vllm_kv_transfer_config(doc: dict[str, Any]) -> None:
    args = vllm_container(pod_spec(doc))["args"]
    value = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert value == KV_TRANSFER
    assert value["kv_connector_extra_config"]["kvnode.runtime_dir"] == "/run/kvnode"


def test_daemonset_peers_and_events_are_reachable(tmp_path: Path) -> None:
    """The peers' DNS seed names the headless Service; the Service exposes the agent's
    peer and event ports; the CURVE paths in the config are where the Secret lands."""
    ds = next(d for d in by_kind("DaemonSet"))
    cfg = agent_config(ds, tmp_path)
    svc = next(s for s in by_kind("Service") if s["spec"].get("clusterIP") == "None")
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    (seed,) = cfg.peers.seeds
    host, port = seed.removeprefix("dns:").rsplit(":", 1)
    assert host.split(".")[:2] == [name, ns]
    assert svc["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"]
    agent = agent_container(pod_spec(ds))
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    svc_ports = {p["targetPort"]: p["port"] for p in svc["spec"]["ports"]}
    assert int(port) == ports["peers"] == svc_ports["peers"]
    assert cfg.peers.listen.endswith(f":{ports['peers']}")
    assert cfg.events.endpoint.endswith(f":{ports['events']}")
    assert cfg.events.replay_endpoint.endswith(f":{ports['events-replay']}")
    vols = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "curve")
    items = {i["path"] for i in vols["curve"]["secret"]["items"]}
    assert cfg.peers.curve_secret_key == f"{mount['mountPath']}/fleet.key_secret"
    assert "fleet.key_secret" in items and "authorized/fleet.key" in items
    assert cfg.peers.curve_authorized_dir == f"{mount['mountPath']}/authorized"
    assert not cfg.peers.insecure


# ---------------------------------------------------------------------- agent mode
AGENT_MODE = ROOT / "deploy" / "kubernetes" / "agent-mode"
# (patched manifest, its patch, the vLLM side's manifest and patch: None where the
# agent and vLLM are one pod)
AGENT_MODE_SHAPES = [
    ("daemonset.yaml", "daemonset-patch.yaml", "vllm-node-client.yaml", "vllm-patch.yaml"),
    ("sidecar.yaml", "sidecar-patch.yaml", None, None),
]


def strategic_merge(base: Any, patch: Any) -> Any:
    """``kubectl patch``'s strategic merge for what these patches touch: maps merge
    key by key; lists of named items (containers, env) merge by name; other lists
    and values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    named = lambda xs: all(isinstance(x, dict) and "name" in x for x in xs)  # noqa: E731
    if isinstance(base, list) and isinstance(patch, list) and named(base) and named(patch):
        merged = [copy.deepcopy(x) for x in base]
        for p in patch:
            at = next((i for i, x in enumerate(merged) if x["name"] == p["name"]), None)
            if at is None:
                merged.append(copy.deepcopy(p))
            else:
                merged[at] = strategic_merge(merged[at], p)
        return merged
    return copy.deepcopy(patch)


def workload_of(path: str) -> dict[str, Any]:
    return next(d for d in docs(ROOT / "deploy" / "kubernetes" / path)
                if d["kind"] in ("DaemonSet", "Deployment"))  # fmt: skip


def patched(path: str, patch: str) -> dict[str, Any]:
    (p,) = docs(AGENT_MODE / patch)
    return strategic_merge(workload_of(path), p)  # type: ignore[no-any-return]


def run_as_user(spec: dict[str, Any], container: dict[str, Any]) -> int | None:
    own = container.get("securityContext", {}).get("runAsUser")
    return own if own is not None else spec.get("securityContext", {}).get("runAsUser")


def test_agent_mode_patches_cover_every_shape() -> None:
    assert sorted(p.name for p in AGENT_MODE.glob("*.yaml")) == sorted(
        x for shape in AGENT_MODE_SHAPES for x in (shape[1], shape[3]) if x
    )


@pytest.mark.parametrize("shape", AGENT_MODE_SHAPES, ids=lambda s: s[0])
def test_agent_mode_patches_give_what_agent_mode_needs(shape: tuple[Any, ...]) -> None:
    """Applied as ``kubectl patch`` would, each patch keeps its manifest valid and gives
    agent mode what it needs: the agent and vLLM in one pid namespace, vLLM as the
    agent's uid (ptrace rights without a capability), vLLM asking for agent mode, and
    (node agent) every GPU visible to the agent without one requested."""
    from kvnode.connector.config import ConnectorConfig

    path, patch, client_path, client_patch = shape
    agent_doc = patched(path, patch)
    vllm_doc = patched(client_path, client_patch) if client_path else agent_doc
    for doc in {id(agent_doc): agent_doc, id(vllm_doc): vllm_doc}.values():
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    aspec, vspec = pod_spec(agent_doc), pod_spec(vllm_doc)
    agent, vllm = agent_container(aspec), vllm_container(vspec)
    if client_path:
        assert aspec.get("hostPID") and vspec.get("hostPID"), "not one pid namespace"
    else:
        assert aspec.get("shareProcessNamespace"), "not one pid namespace"
    uid = run_as_user(aspec, agent)
    assert uid is not None and uid != 0
    assert run_as_user(vspec, vllm) == uid, "vLLM runs as another uid than the agent"
    env = {e["name"]: e.get("value") for e in vllm.get("env", [])}
    args = vllm.get("args", [])
    extra = json.loads(args[args.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert ConnectorConfig.from_sources(extra, env=env).transfer == "agent"
    agent_env = {e["name"]: e.get("value") for e in agent.get("env", [])}
    if client_path:
        assert agent_env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    assert "nvidia.com/gpu" not in str(agent.get("resources", {}))
    # The manifests themselves stay least-privilege: worker mode needs none of it.
    for p in {path, client_path} - {None}:
        spec = pod_spec(workload_of(p))
        assert not spec.get("hostPID") and not spec.get("shareProcessNamespace")
