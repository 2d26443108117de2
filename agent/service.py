"""The agent as a service: start-up, systemd notification, metrics endpoint, SIGHUP
reload. ``kvnode agent`` runs ``run_agent``; the event loop itself is ``server.Agent``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvnode.agent import sdnotify
from kvnode.agent.config import Config, format_size, load_config
from kvnode.agent.logs import parse_level, set_level
from kvnode.agent.metrics import AgentStatsSource, MetricsServer
from kvnode.agent.runtime import raise_fd_limit
from kvnode.agent.server import Agent, StopRequested
from kvnode.errors import ArenaError, ConfigError, KVNodeError

log = logging.getLogger("kvnode.agent")


def run_agent(cfg: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Start, serve until SIGTERM/SIGINT, stop. Returns the process exit code.

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
    except (ArenaError, ConfigError) as exc:
        log.error("%s", exc)
        sdnotify.status(f"failed: {exc}")
        agent.close()
        return 1
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
