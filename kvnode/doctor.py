"""``kvnode doctor`` and ``kvnode agent --check-config``: everything that can be checked
before the agent starts, one finding per line, each naming the setting to fix.

Static checks look and touch nothing (a port is bound and released at once; no file,
directory or segment is created): runtime directory, ``agent.group`` and
``agent.admin_group``, /dev/shm against the arena, memlock and open-file limits, ports,
the CURVE key files, the disk path, boto3. Connect checks (``--connect``, and the
doctor unless ``--offline``) reach out: S3 credentials and bucket, each peer seed's TCP
port and CURVE handshake with our key. The doctor also asks a running agent for its
health.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import resource
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvnode.agent.config import Config, format_size
from kvnode.ipc.process import lock_owner

OK, WARN, FAIL = "ok", "warn", "FAIL"
CONNECT_TIMEOUT_S = 3.0  # per S3 call, per peer handshake


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # OK, WARN or FAIL
    key: str  # the setting (or limit) it is about
    text: str

    def line(self) -> str:
        return f"{self.level:<4} {self.key}: {self.text}"


Check = Callable[[Config], Iterator[Finding]]


# -- runtime directory and groups ------------------------------------------------------
def agent_running(cfg: Config) -> int | None:
    """The pid of an agent holding this runtime directory's lock, else None."""
    lock = cfg.runtime_dir / "agent.lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return lock_owner(os.read(fd, 64).decode(errors="replace"))[0]
    finally:
        os.close(fd)


def check_runtime_dir(cfg: Config) -> Iterator[Finding]:
    key, path = "agent.runtime_dir", cfg.runtime_dir
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            yield Finding(OK, key, f"{path} will be created (in {parent})")
        else:
            yield Finding(FAIL, key, f"{path} does not exist and {parent} is not writable")
        return
    except OSError as exc:
        yield Finding(FAIL, key, f"{path}: {exc.strerror}")
        return
    if not stat.S_ISDIR(st.st_mode):
        yield Finding(FAIL, key, f"{path} is not a directory (a symlink or a file)")
    elif st.st_uid != os.geteuid():
        yield Finding(FAIL, key, f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}")
    elif st.st_mode & stat.S_IWOTH:
        yield Finding(FAIL, key, f"{path} is writable by others: chmod o-w {path}")
    elif not os.access(path, os.W_OK | os.X_OK):
        yield Finding(FAIL, key, f"{path} is not writable")
    else:
        yield Finding(OK, key, str(path))


def check_groups(cfg: Config) -> Iterator[Finding]:
    from kvnode.ipc.segment import group_id

    for key in ("agent.group", "agent.admin_group"):
        name = getattr(cfg.agent, key.split(".")[1], "")
        if not name:
            continue
        try:
            gid = group_id(name)
        except KeyError:
            yield Finding(FAIL, key, f"no group {name!r} on this host")
            continue
        if key == "agent.group" and os.geteuid() != 0 and gid not in os.getgroups():
            yield Finding(FAIL, key, f"the agent's user is not in group {name!r} (cannot chgrp)")
        else:
            yield Finding(OK, key, f"{name} (gid {gid})")


# -- memory ---------------------------------------------------------------------------------
def check_shm(cfg: Config) -> Iterator[Finding]:
    from kvnode.agent.runtime import SHM_DIR, index_bytes, shm_free_bytes

    pages = cfg.arena.cpu_bytes // cfg.arena.page_bytes
    need = pages * cfg.arena.page_bytes + index_bytes(cfg, pages)
    free = shm_free_bytes()
    if free is None:
        yield Finding(WARN, "arena.cpu_bytes", f"cannot tell the free space of {SHM_DIR}")
        return
    running = agent_running(cfg) is not None
    if running:  # its arena is already counted as used; its size is the segment's, not
        # this configuration's (the agent may have been started with other flags)
        try:
            held = os.stat(os.path.join(SHM_DIR, cfg.segment_name.lstrip("/"))).st_size
            what = f"{format_size(held)} in {SHM_DIR}"
        except OSError:
            what = "its arena"
        yield Finding(OK, "arena.cpu_bytes", f"the running agent holds {what}")
    elif free < need:
        yield Finding(FAIL, "arena.cpu_bytes",
                      f"the arena and its index need {format_size(need)}; {SHM_DIR} has "
                      f"{format_size(free)} free (enlarge {SHM_DIR} or lower arena.cpu_bytes)")  # fmt: skip
    else:
        yield Finding(OK, "arena.cpu_bytes",
                      f"{format_size(need)} fits in {SHM_DIR} ({format_size(free)} free)")  # fmt: skip


def check_limits(cfg: Config) -> Iterator[Finding]:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < cfg.arena.cpu_bytes:
        yield Finding(WARN, "memlock",
                      f"limit {format_size(soft)} < arena: GPU clients cannot pin the arena "
                      "(LimitMEMLOCK=infinity in the unit, ulimit -l unlimited)")  # fmt: skip
    else:
        yield Finding(
            OK, "memlock", "unlimited" if soft == resource.RLIM_INFINITY else format_size(soft)
        )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * cfg.agent.clients_max + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        yield Finding(WARN, "agent.clients_max",
                      f"open-file hard limit {hard} < {want} needed for {cfg.agent.clients_max} "
                      "clients (LimitNOFILE= in the unit)")  # fmt: skip


# -- ports ------------------------------------------------------------------------------------
_TCP_RE = re.compile(r"^tcp://(\[[^\]]+\]|[^:/]+):(\d+)$")


def tcp_bind_target(endpoint: str) -> tuple[str, int] | None:
    m = _TCP_RE.match(endpoint)
    if m is None:
        return None
    host = m.group(1).strip("[]")
    return ("0.0.0.0" if host == "*" else host), int(m.group(2))


def port_free(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound now (and is released at once), else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "in use by another process"
        return exc.strerror or str(exc)
    return None


def _bound_endpoints(cfg: Config) -> Iterator[tuple[str, str, int]]:
    from kvnode.agent.events import is_bind_endpoint

    if cfg.metrics.port:
        yield "metrics.port", cfg.metrics.address, cfg.metrics.port
    for key, endpoint in (
        ("peers.listen", cfg.peers.listen),
        ("events.endpoint", cfg.events.endpoint),
        ("events.replay_endpoint", cfg.events.replay_endpoint),
    ):
        bound = key == "peers.listen" or is_bind_endpoint(endpoint)
        target = tcp_bind_target(endpoint) if endpoint and bound else None
        if target is not None:
            yield key, target[0], target[1]


def check_ports(cfg: Config) -> Iterator[Finding]:
    pid = agent_running(cfg)
    for key, host, port in _bound_endpoints(cfg):
        why = port_free(host, port)
        if why is None:
            yield Finding(OK, key, f"{host}:{port} is free")
        elif pid is not None:
            yield Finding(OK, key, f"{host}:{port} in use (the running agent, pid {pid}, has it)")
        else:
            yield Finding(FAIL, key, f"cannot listen on {host}:{port}: {why}")
    for key in ("events.endpoint", "events.replay_endpoint"):
        endpoint = getattr(cfg.events, key.split(".")[1])
        if endpoint.startswith("ipc://"):
            parent = Path(endpoint[len("ipc://") :]).parent
            if not os.access(parent, os.W_OK | os.X_OK):
                yield Finding(FAIL, key, f"{parent} does not exist or is not writable")


# -- keys, disk, S3 ---------------------------------------------------------------------------
def check_keys(cfg: Config) -> Iterator[Finding]:
    p = cfg.peers
    if not (p.listen or p.seeds) or p.insecure:
        if p.insecure and (p.listen or p.seeds):
            yield Finding(WARN, "peers.insecure", "peer links are plaintext and unauthenticated")
        return
    import zmq.auth

    public = None
    path = Path(p.curve_secret_key)
    if not path.is_file() or not os.access(path, os.R_OK):
        why = "no such file" if not path.exists() else f"not a readable file for uid {os.geteuid()}"
        yield Finding(FAIL, "peers.curve_secret_key", f"{path}: {why}")
        yield from _authorized(p.curve_authorized_dir, None)
        return
    try:
        public, secret = zmq.auth.load_certificate(p.curve_secret_key)
        if not secret:
            yield Finding(
                FAIL, "peers.curve_secret_key", f"{p.curve_secret_key}: no secret key in it"
            )
        else:
            yield Finding(OK, "peers.curve_secret_key", p.curve_secret_key)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        yield Finding(FAIL, "peers.curve_secret_key", f"cannot read {p.curve_secret_key}: {why}")
    yield from _authorized(p.curve_authorized_dir, public)


def _authorized(path: str, public: bytes | None) -> Iterator[Finding]:
    import zmq.auth

    key = "peers.curve_authorized_dir"
    try:
        keys = set(zmq.auth.load_certificates(path))
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        yield Finding(FAIL, key, f"cannot read {path}: {why}")
        return
    if not keys:
        yield Finding(FAIL, key, f"{path} holds no public key (*.key): no peer will be let in")
    elif public is not None and public not in keys:
        yield Finding(FAIL, key, f"{path} does not hold this node's public key: peers sharing "
                                 "it will refuse us")  # fmt: skip
    else:
        yield Finding(OK, key, f"{len(keys)} public key(s) in {path}")


def check_disk(cfg: Config) -> Iterator[Finding]:
    path = cfg.disk.path
    if not path:
        return
    key = "disk.path"
    p = Path(path)
    target = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
    if p.exists() and not p.is_dir():
        yield Finding(FAIL, key, f"{path} is not a directory")
        return
    if not os.access(target, os.W_OK | os.X_OK):
        yield Finding(FAIL, key, f"{target} is not writable")
        return
    st = os.statvfs(target)
    free = st.f_bavail * st.f_frsize
    what = f"{path} ({format_size(free)} free)"
    if free < cfg.disk.bytes:
        yield Finding(WARN, "disk.bytes",
                      f"{format_size(cfg.disk.bytes)} configured, {what}: the tier fills "
                      "the disk before its limit")  # fmt: skip
    else:
        yield Finding(OK, key, what)


def check_boto3(cfg: Config) -> Iterator[Finding]:
    if not cfg.s3.bucket:
        return
    try:
        import boto3  # noqa: F401
    except ImportError:
        yield Finding(FAIL, "s3.bucket", "the S3 tier needs boto3: pip install 'kvnode[s3]'")
        return
    yield Finding(OK, "s3.bucket", f"boto3 present for s3://{cfg.s3.bucket}")


STATIC: tuple[Check, ...] = (check_runtime_dir, check_groups, check_shm, check_limits,
                             check_ports, check_keys, check_disk, check_boto3)  # fmt: skip


# -- connect checks ----------------------------------------------------------------------------
def check_s3_reach(cfg: Config) -> Iterator[Finding]:
    s3 = cfg.s3
    if not s3.bucket:
        return
    try:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return  # said by check_boto3
    session = boto3.session.Session()
    if session.get_credentials() is None:
        yield Finding(FAIL, "s3.bucket", "no AWS credentials in the standard chain "
                                         "(environment, ~/.aws, instance or pod identity)")  # fmt: skip
        return
    client = session.client(
        "s3", endpoint_url=s3.endpoint_url or None, region_name=s3.region or None,
        config=BotoConfig(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=CONNECT_TIMEOUT_S,
                          retries={"max_attempts": 1}),
    )  # fmt: skip
    try:
        client.head_bucket(Bucket=s3.bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        yield Finding(FAIL, "s3.bucket", f"s3://{s3.bucket}: {code} ({_s3_words(code)})")
        return
    except BotoCoreError as exc:
        yield Finding(FAIL, "s3.endpoint_url", f"cannot reach S3: {exc}")
        return
    yield Finding(OK, "s3.bucket", f"s3://{s3.bucket} reachable with these credentials")


def _s3_words(code: str) -> str:
    return {"404": "no such bucket", "NoSuchBucket": "no such bucket",
            "403": "access denied to these credentials", "AccessDenied": "access denied",
            }.get(code, "see the S3 error code")  # fmt: skip


def check_peers_reach(cfg: Config) -> Iterator[Finding]:
    p = cfg.peers
    for seed in p.seeds:
        for addr in _resolve(seed):
            if addr is None:
                yield Finding(FAIL, "peers.seeds", f"{seed}: name does not resolve")
                continue
            yield _handshake(cfg, seed, addr)


def _resolve(seed: str) -> list[tuple[str, int] | None]:
    if seed.startswith("tcp://"):
        host, port = seed[len("tcp://") :].rsplit(":", 1)
    else:
        _, host, port = seed.split(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError:
        return [None]
    return [*sorted({(str(i[4][0]), int(i[4][1])) for i in infos})]


def _handshake(cfg: Config, seed: str, addr: tuple[str, int]) -> Finding:
    """TCP connect, then a ZeroMQ handshake with our CURVE key: accepted, refused (our
    key is not in the peer's authorized directory) or no answer."""
    import zmq

    host, port = addr
    where = f"{seed} ({host}:{port})"
    try:
        socket.create_connection(addr, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return Finding(FAIL, "peers.seeds", f"{where} unreachable: {exc.strerror or exc}")
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if not cfg.peers.insecure:
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(cfg.peers.curve_secret_key)
        except (OSError, ValueError):
            sock.close(0)
            return Finding(FAIL, "peers.seeds", f"{where}: not tried (no readable secret key)")
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, public
    mon = sock.get_monitor_socket()
    host_text = f"[{host}]" if ":" in host else host
    sock.connect(f"tcp://{host_text}:{port}")
    try:
        return _await_handshake(mon, where)
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)


def _await_handshake(mon: Any, where: str) -> Finding:
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    failed = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}  # fmt: skip
    while mon.poll(int(CONNECT_TIMEOUT_S * 1000)):
        ev = recv_monitor_message(mon)["event"]
        if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return Finding(OK, "peers.seeds", f"{where} accepts our key")
        if ev in failed or ev == zmq.EVENT_DISCONNECTED:
            return Finding(FAIL, "peers.curve_secret_key",
                           f"{where} refused the handshake: our key is not in its authorized "
                           "directory, or it is not a kvnode peer")  # fmt: skip
    return Finding(FAIL, "peers.seeds", f"{where}: no handshake within {CONNECT_TIMEOUT_S:g} s")


CONNECT: tuple[Check, ...] = (check_s3_reach, check_peers_reach)


# -- a live agent -------------------------------------------------------------------------------
def check_agent(cfg: Config) -> Iterator[Finding]:
    from kvnode.errors import KVNodeError
    from kvnode.stats_tool import fetch

    pid = agent_running(cfg)
    if pid is None:
        yield Finding(OK, "agent", f"no agent running on {cfg.runtime_dir} (not started yet)")
        return
    try:
        snap = fetch(cfg.runtime_dir, CONNECT_TIMEOUT_S)
    except KVNodeError as exc:
        yield Finding(FAIL, "agent", f"pid {pid} holds {cfg.runtime_dir} but {exc}")
        return
    yield Finding(OK, "agent", f"pid {snap['pid']} answers, up {snap['uptime_s']:.0f}s, "
                               f"{snap['clients']} clients")  # fmt: skip
    for name, t in (snap.get("tiers") or {}).items():
        if name != "arena" and not t.get("healthy", True):
            yield Finding(FAIL, f"tier {name}", f"unhealthy ({t.get('errors', 0)} errors)")
    for addr, peer in ((snap.get("peers") or {}).get("peers") or {}).items():
        state = peer.get("state", "?")
        level = OK if state in ("up", "self") else WARN
        yield Finding(level, "peer", f"{addr} {state}")
    ev = snap.get("events") or {}
    if ev.get("dropped"):
        yield Finding(WARN, "events.queue_max", f"{ev['dropped']} events dropped since start")


# -- entry points --------------------------------------------------------------------------------
def findings(cfg: Config, checks: tuple[Check, ...]) -> list[Finding]:
    out: list[Finding] = []
    for check in checks:
        try:
            out.extend(check(cfg))
        except Exception as exc:  # a check that breaks says so; the others still run
            out.append(Finding(FAIL, check.__name__.removeprefix("check_"), f"check failed: {exc}"))
    return out


def check_config(cfg: Config, connect: bool = False) -> int:
    """``kvnode agent --check-config``: each failure one line naming the key (exit 2);
    warnings are printed too but pass."""
    got = findings(cfg, STATIC + (CONNECT if connect else ()))
    for f in got:
        if f.level != OK:
            print(f"kvnode: {'warning: ' if f.level == WARN else ''}config {f.key}: {f.text}",
                  file=sys.stderr)  # fmt: skip
    if any(f.level == FAIL for f in got):
        return 2
    print(f"kvnode: configuration OK (runtime dir {cfg.runtime_dir})")
    return 0


def run_doctor(cfg: Config, args: argparse.Namespace) -> int:
    checks = STATIC + (() if args.offline else CONNECT) + (check_agent,)
    got = findings(cfg, checks)
    if args.json:
        print(json.dumps({"ok": not any(f.level == FAIL for f in got),
                          "findings": [asdict(f) for f in got]}))  # fmt: skip
    else:
        for f in got:
            print(f.line(), flush=True)
    return 1 if any(f.level == FAIL for f in got) else 0
