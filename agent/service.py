"""The agent as a service: start-up, systemd notification, metrics endpoint, SIGHUP
reload. ``kvnode agent`` runs ``run_agent``; the event loop itself is ``server.Agent``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from kvnode.agent import sdnotify
from kvnode.agent.config import Config, format_size, load_config
from kvnode.agent.logs import parse_level, set_level
from kvnode.agent.metrics import AgentStatsSource, MetricsServer
from kvnode.agent.runtime import blame, raise_fd_limit
from kvnode.agent.server import Agent, StopRequested
from kvnode.errors import KVNodeError

log = logging.getLogger("kvnode.agent")


def run_agent(cfg: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Start, serve until SIGTERM/SIGINT, stop. Returns the process exit code: 0 after
    a stop, 2 when the configuration stops it from starting (one line naming the key,
    nothing left in /dev/shm), 1 for anything else.

    ``reload_config`` re-reads the configuration on SIGHUP (the CLI passes its own
    loader); without it the file and flags recorded in ``cfg.sources`` are read again.
    """
    log.info("open-file limit %d", raise_fd_limit())
    agent = Agent(cfg)
    # Signals first: a SIGTERM during a multi-GiB pre-fault must still unlink it.
    agent.install_signal_handlers()
    sdnotify.status(f"mapping {format_size(cfg.arena.cpu_bytes)} arena")
    stats_source = AgentStatsSource(cfg.runtime_dir)
    metrics = MetricsServer(cfg.metrics.address, cfg.metrics.port, stats_source)
    try:
        agent.start()
        metrics.start()
    except StopRequested:
        log.info("stopped while starting")
        agent.close()
        return 0
    except Exception as exc:
        return _failed_start(cfg, agent, exc)
    for line in startup_lines(cfg, agent.snapshot(), metrics.url if metrics.enabled else ""):
        log.info("%s", line)
    for line in startup_warnings(cfg):
        log.warning("%s", line)
    agent.hooks_ready.append(
        lambda: sdnotify.ready(f"serving {cfg.endpoint}, {format_size(cfg.arena.cpu_bytes)} arena")
    )
    agent.hooks_stopping.append(lambda: sdnotify.stopping("flushing write-back queues"))
    agent.hooks_stopping.append(metrics.stop)
    agent.hooks_stopping.append(stats_source.close)
    agent.hooks_reload.append(_reloader(reload_config or (lambda: _load_again(cfg)), agent))
    try:
        agent.serve_forever()
    finally:
        agent.close()
    return 0


def _failed_start(cfg: Config, agent: Agent, exc: Exception) -> int:
    """One line naming the setting (a traceback only for what no setting explains),
    then everything made so far is removed: arena, index, socket, lock."""
    err = blame(cfg, exc)
    if err is not None:
        log.error("cannot start: %s", err)
    else:
        log.error("cannot start: %s: %s", type(exc).__name__, exc, exc_info=True)
    sdnotify.status(f"failed: {err or exc}")
    agent.close()
    return 2 if err is not None else 1


def startup_warnings(cfg: Config) -> list[str]:
    """What starts but cannot work: peers with no authorized key let nobody in."""
    p = cfg.peers
    if not (p.listen or p.seeds) or p.insecure:
        return []
    import zmq.auth

    try:
        keys = zmq.auth.load_certificates(p.curve_authorized_dir)
    except (OSError, ValueError) as exc:
        return [f"peers: cannot read {p.curve_authorized_dir}: {exc}"]
    if not keys:
        return [
            f"peers: {p.curve_authorized_dir} holds no public key (*.key): every peer is "
            "refused and ours is refused by peers sharing it (peers.curve_authorized_dir)"
        ]
    return []


def startup_lines(cfg: Config, snap: Mapping[str, Any], metrics_url: str) -> list[str]:
    """What this agent serves, one line per part: tiers, peers, events, metrics."""
    out = []
    for name, t in (snap.get("tiers") or {}).items():
        if name == "arena":
            continue
        state = "healthy" if t.get("healthy", True) else "UNHEALTHY"
        where = {"disk": cfg.disk.path, "s3": f"s3://{cfg.s3.bucket}/{cfg.s3.prefix}"}.get(name, "")
        out.append(
            f"tier {name}: {where} {state}, {t.get('entries', 0)} entries "
            f"({format_size(t.get('bytes', 0))}), {t.get('write_policy', '')}"
        )
    if not (cfg.disk.path or cfg.s3.bucket):
        out.append("tiers: arena only (disk.path and s3.bucket are empty)")
    p = cfg.peers
    if p.listen or p.seeds:
        mode = "INSECURE plaintext" if p.insecure else f"CURVE, keys from {p.curve_authorized_dir}"
        peers = (snap.get("peers") or {}).get("peers") or {}
        states = ", ".join(f"{a} {v.get('state', '?')}" for a, v in sorted(peers.items()))
        out.append(
            f"peers: serving {p.listen or 'off'}; {len(p.seeds)} seeds ({states or 'none yet'}); {mode}"
        )
    else:
        out.append("peers: off (peers.listen and peers.seeds are empty)")
    ev = cfg.events
    if ev.endpoint:
        replay = f", replay on {ev.replay_endpoint}" if ev.replay_endpoint else ", no replay"
        out.append(f"events: publishing on {ev.endpoint}{replay}")
    else:
        out.append("events: off (events.endpoint is empty)")
    out.append(f"metrics: {metrics_url}" if metrics_url else "metrics: off (metrics.port = 0)")
    return out


# Settings a running agent applies on SIGHUP; any other change waits for a restart.
RELOADABLE = (
    "agent.log_level",
    "disk.bytes",
    "disk.queue_max",
    "s3.queue_max",
    "s3.admit_min_hits",
)


def _load_again(cfg: Config) -> Config:
    """The same file, environment and flags that produced ``cfg``, read again."""
    files = [src[len("file:") :] for src in cfg.sources.values() if src.startswith("file:")]
    flags = {key: _get(cfg, key) for key, src in cfg.sources.items() if src == "flag"}
    return load_config(path=files[0] if files else None, overrides=flags)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _reloader(
    load: Callable[[], Config], agent: Agent | None = None
) -> Callable[[Config], list[str]]:
    def reload(cfg: Config) -> list[str]:
        try:
            new = load()
        except KVNodeError as exc:
            return [f"configuration not reloaded: {exc}"]
        old_level, new_level = cfg.agent.log_level, new.agent.log_level
        if new_level != old_level:
            # Said under the more verbose of the two levels, so it shows when either does.
            quieter = parse_level(new_level) > parse_level(old_level)
            if quieter:
                log.info("reload: log level %s -> %s", old_level, new_level)
            set_level(new_level)
            cfg.agent.log_level = new_level
            if not quieter:
                log.info("reload: log level %s -> %s", old_level, new_level)
        old, cur = cfg.as_dict(), new.as_dict()
        if agent is not None and agent.tiers is not None:
            for note in agent.tiers.apply_limits(new):
                log.info("reload: %s", note)
        for key in RELOADABLE:
            sec, name = key.split(".", 1)
            setattr(getattr(cfg, sec), name, getattr(getattr(new, sec), name))
        return [
            f"{sec}.{k} changed ({old[sec][k]!r} -> {cur[sec][k]!r}); restart to apply"
            for sec in old
            for k in old[sec]
            if old[sec][k] != cur[sec][k] and f"{sec}.{k}" not in RELOADABLE
        ]

    return reload
