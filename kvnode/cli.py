"""The ``kvnode`` command: ``agent``, ``stats``, ``events``, ``cache``, ``doctor``,
``config show``, ``keygen``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from kvnode import __version__
from kvnode.errors import ConfigError, KVNodeError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="TOML config (default /etc/kvnode/agent.toml if present)"
    )
    p.add_argument(
        "--runtime-dir", metavar="DIR", help="socket and lock directory (agent.runtime_dir)"
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvnode", description="Node-level KV cache for vLLM.")
    ap.add_argument("--version", action="version", version=f"kvnode {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    ag = sub.add_parser("agent", help="run the node agent")
    _add_config_args(ag)
    ag.add_argument("--cpu-bytes", metavar="SIZE", help="arena size, e.g. 4GiB (arena.cpu_bytes)")
    ag.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ag.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. disk.path=/nvme/kv",
    )
    ag.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration and what it needs (ports, paths, keys, /dev/shm) and exit",
    )
    ag.add_argument(
        "--connect",
        action="store_true",
        help="with --check-config: also reach S3 and the peers (see kvnode doctor)",
    )

    st = sub.add_parser("stats", help="show the agent's live statistics")
    _add_config_args(st)
    mode = st.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print one JSON object")
    mode.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2); piped, one line per refresh",
    )
    mode.add_argument(
        "--check", action="store_true", help="exit 0 if the agent answers, 1 otherwise"
    )
    st.add_argument("--timeout", type=_seconds, default=2.0, metavar="SECONDS")

    ev = sub.add_parser("events", help="tail an agent's KV event stream (this node or another)")
    _add_config_args(ev)
    ev.add_argument("--json", action="store_true", help="one JSON object a line")
    ev.add_argument(
        "--endpoint",
        metavar="URL",
        help="the agent's stream to connect to, e.g. tcp://node7:7471 "
        "(default: this node's events.endpoint)",
    )
    ev.add_argument(
        "--bind",
        action="store_true",
        help="bind --endpoint and wait for agents to connect (be their collector)",
    )
    ev.add_argument("--replay-endpoint", metavar="URL", help="default: events.replay_endpoint")
    ev.add_argument(
        "--replay-from", type=int, metavar="SEQ", help="first show the batches from SEQ on"
    )
    ev.add_argument("--topic", metavar="TOPIC", help="default: events.topic")
    ev.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events")
    ev.add_argument(
        "--idle-exit", type=_seconds, metavar="SECONDS", help="exit after SECONDS with no event"
    )

    _add_cache_parser(sub)

    dr = sub.add_parser("doctor", help="check everything the agent needs, one line each")
    _add_config_args(dr)
    dr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dr.add_argument("--cpu-bytes", metavar="SIZE")
    dr.add_argument("--offline", action="store_true", help="do not contact S3 or the peers")
    dr.add_argument("--json", action="store_true", help="one JSON object")

    cf = sub.add_parser("config", help="configuration tools")
    cfs = cf.add_subparsers(dest="config_command", metavar="COMMAND")
    show = cfs.add_parser("show", help="print the effective configuration and each value's source")
    _add_config_args(show)
    show.add_argument("--cpu-bytes", metavar="SIZE")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--json", action="store_true")

    kg = sub.add_parser("keygen", help="write a CURVE certificate pair for peer links")
    kg.add_argument("name", metavar="NAME", help="writes NAME.key and NAME.key_secret")
    kg.add_argument("--dir", required=True, metavar="DIR", help="directory to write into")
    kg.add_argument("--force", action="store_true", help="replace existing files")
    return ap


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 2 or 0.5), got {text!r}")
    return value


def _add_cache_parser(sub: Any) -> None:
    ca = sub.add_parser("cache", help="inspect and manage what is cached (operator)")
    cas = ca.add_subparsers(dest="cache_command", metavar="COMMAND")
    ls = cas.add_parser("list", help="what is cached: totals per tier, then entries")
    ls.add_argument("--tier", choices=["arena", "disk", "all"], default="all")
    ls.add_argument("--sort", choices=["hits", "age", "size"], default="hits")
    ls.add_argument("--limit", type=int, default=20, metavar="N", help="entries to show")
    sh = cas.add_parser("show", help="one key in every tier")
    sh.add_argument("key", metavar="KEY", help="32 hex digits")
    dp = cas.add_parser("drop", help="remove keys (or a namespace) from the arena and the disk")
    dp.add_argument("keys", nargs="*", metavar="KEY")
    dp.add_argument("--namespace", metavar="NS", help="every entry of a namespace (32 hex digits)")
    cl = cas.add_parser("clear", help="remove every entry of a tier")
    cl.add_argument("tier", choices=["arena", "disk"])
    cl.add_argument("--yes", action="store_true", help="do it (without: say what would go)")
    for p in (ls, sh, dp, cl):
        _add_config_args(p)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "runtime_dir", None):
        out["agent.runtime_dir"] = args.runtime_dir
    if getattr(args, "cpu_bytes", None):
        out["arena.cpu_bytes"] = args.cpu_bytes
    if getattr(args, "log_level", None):
        out["agent.log_level"] = args.log_level
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError(item, "--set expects KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _load(args: argparse.Namespace) -> Any:
    from kvnode.agent.config import load_config

    return load_config(path=args.config, overrides=_overrides(args))


COMMANDS = "agent, stats, events, cache, doctor, config, keygen"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"kvnode: {exc}", file=sys.stderr)
        return 2
    except KVNodeError as exc:
        print(f"kvnode: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd is None:
        print(f"kvnode: which command? one of {COMMANDS} (kvnode --help)", file=sys.stderr)
        return 2
    if cmd == "agent":
        return _cmd_agent(args)
    if cmd == "stats":
        from kvnode.stats_tool import run_stats

        return run_stats(_load(args).runtime_dir, args)
    if cmd == "events":
        from kvnode.events_tool import run_events

        return run_events(_load(args), args)
    if cmd == "cache":
        if args.cache_command is None:
            print("kvnode cache: which one? list, show, drop or clear", file=sys.stderr)
            return 2
        from kvnode.cache_tool import run_cache

        return run_cache(_load(args), args)
    if cmd == "doctor":
        from kvnode.doctor import run_doctor

        return run_doctor(_load(args), args)
    if cmd == "config":
        if args.config_command is None:
            print("kvnode config: which one? show (kvnode config show)", file=sys.stderr)
            return 2
        return _cmd_config_show(args)
    return _cmd_keygen(args)


def _setup_logging(level: str) -> None:
    try:
        from kvnode.agent.logs import setup_logging
    except ImportError:
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return
    setup_logging(level)


def _cmd_agent(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.check_config:
        from kvnode.doctor import check_config

        return check_config(cfg, connect=args.connect)
    _setup_logging(cfg.agent.log_level)
    from kvnode.agent.service import run_agent

    return run_agent(cfg, reload_config=lambda: _load(args))


def _cmd_keygen(args: argparse.Namespace) -> int:
    """pyzmq's zmq.auth certificate pair. The secret file is made owner-only: it is
    the fleet's identity (every agent presents it)."""
    import os
    from pathlib import Path

    import zmq.auth

    name = args.name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError("NAME", f"{name!r}: a plain file name is expected")
    out = Path(args.dir)
    targets = [out / f"{name}.key", out / f"{name}.key_secret"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        print(f"kvnode: {', '.join(existing)} exists (use --force to replace)", file=sys.stderr)
        return 1
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret is never readable by others, not even briefly
        try:
            public, secret = zmq.auth.create_certificates(out, name)
        finally:
            os.umask(old_umask)
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
    except OSError as exc:
        print(f"kvnode: cannot write certificates in {out}: {exc}", file=sys.stderr)
        return 1
    print(f"public: {public}\nsecret: {secret}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    """Every key, its value and where it came from. Sizes read as sizes (``"4GiB"``,
    which parses back to the same number); keys left empty show what the agent will
    use. ``--json`` keeps plain numbers for scripts, with the resolved value beside."""
    from kvnode.agent.config import exact_size

    cfg = _load(args)
    data = cfg.as_dict()
    resolved = cfg.resolved()
    if args.json:
        out: dict[str, Any] = {}
        for sec, vals in data.items():
            for k, v in vals.items():
                key = f"{sec}.{k}"
                out[key] = {"value": v, "source": cfg.sources.get(key, "default")}
                if key in resolved and resolved[key] != v:
                    out[key]["resolved"] = resolved[key]
        print(json.dumps(out, indent=2, default=str))
        return 0
    for sec, vals in data.items():
        print(f"[{sec}]")
        for k, v in vals.items():
            key = f"{sec}.{k}"
            src = cfg.sources.get(key, "default")
            if key in resolved and not v:
                v, src = resolved[key], f"{src}, resolved"
            elif cfg.is_size(key) and isinstance(v, int):
                v = exact_size(v)
            print(f"{k} = {json.dumps(v)}  # {src}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
