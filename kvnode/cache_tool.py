"""``kvnode cache``: what the node has cached, and the operator's hand on it.

    kvnode cache list [--tier arena|disk] [--sort hits|age|size] [--limit N]
    kvnode cache show KEY
    kvnode cache drop KEY...
    kvnode cache clear arena|disk [--yes]

Every command is an operator's: the agent checks the connection's credentials (the
agent's user, root or ``agent.admin_group``) and refuses anyone else. ``drop`` and
``clear`` never touch S3: the bucket is the fleet's, its lifecycle rules expire objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvnode.errors import AgentError, ConfigError, KVNodeError

KEY_HEX = 32


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) * 2 != KEY_HEX:
        raise ConfigError(
            "KEY", f"{text!r}: a key is {KEY_HEX} hex digits (as kvnode cache list shows)"
        )
    return key


def run_cache(cfg: Any, args: argparse.Namespace) -> int:
    from kvnode.ipc import protocol as P

    cmd = args.cache_command
    if cmd == "clear" and not args.yes:
        print(f"kvnode cache clear {args.tier}: every entry of the {args.tier} tier would be "
              "removed; run again with --yes to do it", file=sys.stderr)  # fmt: skip
        return 2
    keys = [parse_key(k) for k in getattr(args, "keys", None) or [getattr(args, "key", "")] if k]
    tier, limit, sort = "", 0, "hits"
    namespace = getattr(args, "namespace", None)
    if cmd == "drop" and bool(keys) == bool(namespace):
        raise ConfigError("KEY", "name keys to drop, or --namespace NS (not both)")
    if namespace:
        keys, cmd = [parse_key(namespace)], "drop_namespace"
    if cmd == "list":
        tier = "" if args.tier == "all" else args.tier
        limit, sort = max(0, min(args.limit, P.ADMIN_LIST_MAX)), args.sort
    elif cmd == "clear":
        tier = args.tier
    op = {"list": P.AdminOp.LIST, "show": P.AdminOp.SHOW, "drop": P.AdminOp.DROP,
          "drop_namespace": P.AdminOp.DROP_NAMESPACE, "clear": P.AdminOp.CLEAR}[cmd]  # fmt: skip
    try:
        result = _ask(cfg, args.timeout, int(op), keys, tier, limit, sort)
    except AgentError as exc:
        if exc.code == P.ErrCode.NOT_PERMITTED:
            print("kvnode: the agent refused: kvnode cache is for operators (the agent's "
                  "user, root, or a member of agent.admin_group)", file=sys.stderr)  # fmt: skip
            return 1
        raise
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print("\n".join(_lines(cmd, result)))
    return 0


def _ask(cfg: Any, timeout_s: float, op: int, keys: list[bytes], tier: str, limit: int,
         sort: str) -> dict[str, Any]:  # fmt: skip
    from kvnode.ipc.client import AgentClient
    from kvnode.stats_tool import NoAnswer

    sock = cfg.runtime_dir / "agent.sock"
    if not sock.exists():
        raise NoAnswer(f"no agent at {cfg.runtime_dir} ({sock} does not exist: is it running?)")
    client = AgentClient(cfg.runtime_dir, name="kvnode-cache", timeout_s=timeout_s, heartbeat=False)
    try:
        return client.admin(op, keys, tier, limit, sort)
    except AgentError:
        raise
    except KVNodeError as exc:
        raise NoAnswer(
            f"no answer from the agent at {sock} within {timeout_s:g} s ({exc})"
        ) from None
    finally:
        client.close()


def _size(n: float) -> str:
    from kvnode.agent.config import format_size

    return format_size(n)


def _lines(cmd: str, r: dict[str, Any]) -> list[str]:
    if cmd == "list":
        return _list_lines(r)
    if cmd == "show":
        out = []
        for k in r["keys"]:
            where = [t for t in ("arena", "disk", "s3") if t in k]
            out.append(f"{k['key']}: {', '.join(where) if where else 'not cached on this node'}")
            if "arena" in k:
                a = k["arena"]
                out.append(f"  arena: {a['state']} {_size(a['size'])} hits {a['hits']} pins "
                           f"{a['pins']} age {a['age_s']:.0f}s "
                           f"{'verified' if a['verified'] else 'unverified'} parent {a['parent'] or '-'}")  # fmt: skip
            for t in ("disk", "s3"):
                if t in k:
                    out.append(f"  {t}: {_size(k[t]['size'])}")
        return out
    if cmd in ("drop", "drop_namespace"):
        return [f"dropped {r['dropped']} entries from the arena and the disk (S3 keeps its copies)"]
    bg = " (the disk is cleared in the background)" if r.get("background") else ""
    return [f"cleared the {r['tier']} tier: {r['dropped']} entries{bg}"]


def _list_lines(r: dict[str, Any]) -> list[str]:
    out = ["tier    entries       bytes  health"]
    for name, t in r["tiers"].items():
        health = "ok" if t.get("healthy", True) else "UNHEALTHY"
        out.append(f"{name:<6} {t['entries']:>9} {_size(t['bytes']):>11}  {health}")
    spaces = r.get("namespaces") or {}
    if any(spaces):
        out.append("")
        out.append(f"{'namespace':<32}  {'entries':>8} {'bytes':>10} {'hits':>8}")
        for ns, t in sorted(spaces.items(), key=lambda x: -x[1]["bytes"]):
            out.append(
                f"{ns or '(none)':<32}  {t['entries']:>8} {_size(t['bytes']):>10} {t['hits']:>8}"
            )
    arena = r.get("arena") or []
    if arena:
        out.append("")
        out.append(f"arena ({len(arena)} shown)")
        out.append(f"{'key':<32}  {'state':<9} {'size':>9} {'hits':>6} {'age':>7}  pins")
        for e in arena:
            out.append(f"{e['key']}  {e['state']:<9} {_size(e['size']):>9} {e['hits']:>6} "
                       f"{e['age_s']:>6.0f}s  {e['pins']}")  # fmt: skip
    disk = r.get("disk") or []
    if disk:
        out.append("")
        out.append(f"disk ({len(disk)} most recently used)")
        for e in disk:
            out.append(f"{e['key']}  {_size(e['size']):>9}")
    return out
