"""Agent configuration: embedded defaults < TOML file < KVNODE_* environment < flags.

A key ``section.name`` maps to the environment variable ``KVNODE_SECTION_NAME``.
Raw settings are read here, in one place; derived limits are computed in
``Config.derive()`` and their relationships are checked at start-up.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kvnode.agent.policy import POLICIES
from kvnode.agent.tenants import parse_shares
from kvnode.cores import COPY_CORES_MODES, check_cores_setting
from kvnode.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/kvnode/agent.toml"
ENV_PREFIX = "KVNODE_"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B|[KMGT])?\s*$", re.IGNORECASE)
_SIZE_MULT = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


def parse_size(text: str | int) -> int:
    """'512MiB' -> 536870912. Plain integers are bytes; MB/GB are decimal."""
    if isinstance(text, bool):
        raise ValueError("not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("size must be >= 0")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 4GiB)")
    unit = m.group(2).lower() if m.group(2) else None
    return int(float(m.group(1)) * _SIZE_MULT[unit])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}B"


def exact_size(n: int) -> str:
    """The largest binary unit that states ``n`` exactly: 1073741824 -> '1GiB',
    1500 -> '1500B'. It reads back through ``parse_size`` to the same number."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def _size(default: int | str, **meta: Any) -> Any:
    return field(default=parse_size(default), metadata={"kind": "size", **meta})


def _list() -> Any:
    """A list of strings: a TOML array, or comma-separated from environment or --set."""
    return field(default_factory=list, metadata={"kind": "list"})


def parse_list(value: Any) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']; a list must hold only strings."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"not a list of strings: {value!r}")


def _default_runtime_dir() -> str:
    base = Path("/run/kvnode")
    try:
        base.mkdir(mode=0o755, exist_ok=True)
        if os.access(base, os.W_OK):
            return str(base)
    except OSError:
        pass
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return str(Path(xdg) / "kvnode")
    return f"/tmp/kvnode-{os.getuid()}"


def _default_cpu_bytes() -> int:
    """A modest share of RAM: 1/8 of physical memory, between 256 MiB and 16 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 1024**3
    return max(256 * 1024**2, min(16 * 1024**3, total // 8)) // (1024**2) * 1024**2


@dataclass(slots=True)
class AgentSection:
    runtime_dir: str = ""  # "" -> /run/kvnode when writable, else per-user
    group: str = ""  # grant this group access to arena and socket
    # Operators besides the agent's own user (and root): may drop keys and clear tiers.
    admin_group: str = ""
    log_level: str = "info"
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    client_check_interval_s: float = 0.1  # ignored: liveness is event-driven (registry.py)
    clients_max: int = 1024
    client_pins_max: int = 65536  # pins one client holds at once (a key pinned twice: 2)
    client_leases_max: int = 65536  # reservations one client holds at once
    pin_ttl_s: float = 300.0  # a pin held longer is released by the agent (counted)
    connections_max: int = 4096  # local connections open at once, registered or not
    connections_per_s_max: int = 200  # local connections accepted in one second
    connections_per_process_max: int = 512  # local connections open at once from one process
    hello_timeout_s: float = 10.0  # a connection without a client silent this long is closed
    request_bytes_max: int = field(default=parse_size("16MiB"), metadata={"kind": "size"})
    batch_keys_max: int = 65536
    shutdown_flush_s: float = 20.0
    # Threads the CPU mover copies with in agent mode (cross-memory attach pins every
    # page it copies: one core reaches about half of memcpy's rate).
    cpu_copy_threads: int = 2
    # Cores they run on: "auto" (off the cores the node's bound threads run on, vLLM's
    # compute threads, when any are left), "all" (wherever the kernel puts them) or a
    # core list such as "2-3,6".
    cpu_copy_cores: str = "auto"


@dataclass(slots=True)
class ArenaSection:
    cpu_bytes: int = field(default_factory=_default_cpu_bytes, metadata={"kind": "size"})
    page_bytes: int = _size("64KiB")
    policy: str = "prefix"  # "prefix", "s3fifo" or "lru"
    prefault: bool = True
    hugepages: bool = True
    publish_index: bool = True  # the arena's keys in shared memory for lookups
    segment_name: str = ""  # "" -> derived from runtime dir
    reserve_ttl_s: float = 60.0  # a reservation not committed by then is dropped
    # With write-back tiers: share of the arena kept free (victims copied out ahead of
    # stores); a store that still finds no room drops victims unsaved (counted).
    headroom_share: float = 0.05
    # Tenants: the share of the arena one namespace may hold (1.0: no limit), and
    # per-namespace overrides as "<32 hex digits of the namespace>=<share>".
    namespace_share: float = 1.0
    namespace_shares: list[str] = _list()


@dataclass(slots=True)
class DiskSection:
    path: str = ""  # "" -> disk tier off
    bytes: int = _size("64GiB")
    o_direct: bool = False
    fsync: bool = True  # fdatasync each file before it is renamed into place
    write_policy: str = "write_back"  # "write_through" or "write_back"
    queue_max: int = 256
    io_threads: int = 2


@dataclass(slots=True)
class S3Section:
    bucket: str = ""  # "" -> S3 tier off
    prefix: str = "kvnode/"
    endpoint_url: str = ""
    region: str = ""
    codec: str = "none"  # "none" or "lz4"
    write_policy: str = "write_back"
    admit_min_hits: int = 0  # only chunks looked up at least this often go to S3
    queue_max: int = 256
    concurrency: int = 8
    timeout_s: float = 10.0
    retries_max: int = 3
    multipart_bytes: int = _size("64MiB")
    negative_ttl_s: float = 5.0  # remember S3 misses this long (no repeated probes)
    stuck_after_s: float = 4.0  # a request unanswered this long, nothing else answered: stuck


@dataclass(slots=True)
class PromoteSection:
    inflight_max: int = 256
    deadline_s: float = 2.0


@dataclass(slots=True)
class MetricsSection:
    port: int = 0  # 0 -> off
    address: str = "127.0.0.1"


@dataclass(slots=True)
class PeersSection:
    listen: str = ""  # "" -> not serving peers, e.g. tcp://0.0.0.0:7470
    seeds: list[str] = _list()  # tcp://HOST:PORT and dns:NAME:PORT (re-resolved)
    curve_secret_key: str = ""  # this fleet's secret certificate (kvnode keygen)
    curve_authorized_dir: str = ""  # public certificates of the clients let in
    insecure: bool = False  # plaintext, no authentication: only when true
    deadline_ms: int = 5  # a lookup fanned out to peers waits at most this long
    fetch_timeout_ms: int = 2000  # one fetch from the chosen peer
    fetch_inflight_max: int = 256  # chunks being fetched at once
    fetch_bytes_max: int = _size("512MiB")  # arena bytes reserved for fetches at once
    queue_max: int = 64  # requests outstanding to one peer
    serve_bytes_max: int = _size("512MiB")  # arena bytes pinned for sends at once
    negative_ttl_s: float = 2.0  # keys no peer had are not asked again for this long
    resolve_interval_s: float = 10.0  # dns: seeds are resolved again this often
    peer_bytes_inflight_max: int = _size("128MiB")  # bytes being fetched from one peer
    serve_peer_bytes_max: int = _size("128MiB")  # arena bytes pinned for one connection
    bench_s: float = 60.0  # a peer that sent bad or excess bytes is not asked this long
    directory: bool = True  # follow peers' event streams; a miss asks one holder
    directory_entries_max: int = 4_000_000  # keys the directory holds; more are dropped
    directory_peers_max: int = 256  # peers followed; more are asked as before
    fallback_asks_per_s: float = 50.0  # misses asked of every peer while streams resync
    keep_fetched: str = "second"  # "second": a fetched chunk is kept when fetched again
    borrow_s: float = 5.0  # a fetched chunk not kept is readable this long, then dropped


@dataclass(slots=True)
class EventsSection:
    endpoint: str = ""  # "" -> off; e.g. tcp://*:7471 (bind) or ipc:///run/kvnode/events
    replay_endpoint: str = ""  # "" -> no replay socket; e.g. tcp://*:7472
    topic: str = ""
    hwm: int = 100_000  # PUB send high-water mark (messages)
    queue_max: int = 100_000  # events waiting for the next flush; more are dropped
    replay_batches_max: int = 10_000  # batches kept for replay
    replay_bytes_max: int = _size("256MiB")  # bytes of batches kept for replay
    insecure: bool = False  # tcp endpoints in plaintext, open to anyone: only when true
    replay_requesters_max: int = 32  # requesters served (or holding bytes) at once
    replay_requests_per_s: float = 2.0  # replay requests per requester (burst: twice)
    replay_requester_bytes_max: int = _size("16MiB")  # queued to one requester, unread
    replay_requester_bytes_per_s: int = _size("64MiB")  # replayed to one requester
    replay_stall_s: float = 10.0  # a replay nobody reads from this long is abandoned


@dataclass(slots=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    arena: ArenaSection = field(default_factory=ArenaSection)
    disk: DiskSection = field(default_factory=DiskSection)
    s3: S3Section = field(default_factory=S3Section)
    promote: PromoteSection = field(default_factory=PromoteSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    peers: PeersSection = field(default_factory=PeersSection)
    events: EventsSection = field(default_factory=EventsSection)
    # "section.name" -> "default" | "file:PATH" | "env:NAME" | "flag"
    sources: dict[str, str] = field(default_factory=dict)

    # derived ---------------------------------------------------------------
    @property
    def runtime_dir(self) -> Path:
        return Path(self.agent.runtime_dir or _default_runtime_dir())

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "agent.sock"

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @property
    def segment_name(self) -> str:
        if self.arena.segment_name:
            name = self.arena.segment_name
            return name if name.startswith("/") else "/" + name
        import hashlib

        digest = hashlib.blake2b(str(self.runtime_dir.resolve()).encode(), digest_size=6)
        return f"/kvnode-{os.getuid()}-{digest.hexdigest()}"

    def validate(self) -> None:
        """Check relationships between settings; raises ConfigError naming the key."""
        a, ar = self.agent, self.arena
        if a.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("agent.log_level", "must be debug, info, warning or error")
        if a.heartbeat_interval_s <= 0:
            raise ConfigError("agent.heartbeat_interval_s", "must be > 0")
        if a.heartbeat_timeout_s < 2 * a.heartbeat_interval_s:
            raise ConfigError(
                "agent.heartbeat_timeout_s", "must be at least twice agent.heartbeat_interval_s"
            )
        if a.connections_max < a.clients_max:
            raise ConfigError("agent.connections_max", "must be at least agent.clients_max")
        if a.hello_timeout_s <= 0:
            raise ConfigError("agent.hello_timeout_s", "must be > 0")
        for key in (
            "clients_max",
            "client_pins_max",
            "client_leases_max",
            "connections_per_s_max",
            "connections_per_process_max",
        ):
            if getattr(a, key) < 1:
                raise ConfigError(f"agent.{key}", "must be >= 1")
        if a.pin_ttl_s <= 0:
            raise ConfigError("agent.pin_ttl_s", "must be > 0")
        if not 1 <= a.cpu_copy_threads <= 64:
            raise ConfigError("agent.cpu_copy_threads", "must be between 1 and 64")
        why = check_cores_setting(a.cpu_copy_cores, COPY_CORES_MODES)
        if why:
            raise ConfigError("agent.cpu_copy_cores", why)
        if ar.page_bytes < 4096 or ar.page_bytes & (ar.page_bytes - 1):
            raise ConfigError("arena.page_bytes", "must be a power of two >= 4096")
        if ar.cpu_bytes < 16 * ar.page_bytes:
            raise ConfigError("arena.cpu_bytes", "must hold at least 16 pages")
        if not 0.0 <= ar.headroom_share <= 0.5:
            raise ConfigError("arena.headroom_share", "must be between 0 and 0.5")
        if not 0.0 < ar.namespace_share <= 1.0:
            raise ConfigError("arena.namespace_share", "must be in (0, 1]")
        parse_shares(ar.namespace_shares)
        if ar.policy not in POLICIES:
            raise ConfigError("arena.policy", "must be one of " + ", ".join(POLICIES))
        for section in ("disk", "s3"):
            pol = getattr(self, section).write_policy
            if pol not in ("write_through", "write_back"):
                raise ConfigError(f"{section}.write_policy", "must be write_through or write_back")
        if self.s3.codec not in ("none", "lz4"):
            raise ConfigError("s3.codec", "must be none or lz4")
        if self.s3.stuck_after_s <= 0:
            raise ConfigError("s3.stuck_after_s", "must be > 0")
        if self.disk.path and self.disk.bytes <= 0:
            raise ConfigError("disk.bytes", "must be > 0 when disk.path is set")
        if not 0 <= self.metrics.port <= 65535:
            raise ConfigError("metrics.port", "must be 0 (off) or a TCP port")
        for name in ("queue_max",):
            for section in ("disk", "s3"):
                if getattr(getattr(self, section), name) < 1:
                    raise ConfigError(f"{section}.{name}", "must be >= 1")
        self._validate_peers()
        self._validate_events()

    def _validate_peers(self) -> None:
        p = self.peers
        if p.listen and not p.listen.startswith("tcp://"):
            raise ConfigError("peers.listen", "must be tcp://HOST:PORT or empty (off)")
        for seed in p.seeds:
            if not re.match(r"^(tcp://\S+:\d+|dns:[^:\s]+:\d+)$", seed):
                raise ConfigError(
                    "peers.seeds", f"{seed!r}: expected tcp://HOST:PORT or dns:NAME:PORT"
                )
        if (p.listen or p.seeds) and not p.insecure:
            for key in ("curve_secret_key", "curve_authorized_dir"):
                if not getattr(p, key):
                    raise ConfigError(f"peers.{key}", "required unless peers.insecure = true")
        if not 1 <= p.directory_peers_max <= 512:
            raise ConfigError("peers.directory_peers_max", "must be 1..512")
        if p.directory_entries_max < 1 or not p.fallback_asks_per_s > 0:
            key = "directory_entries_max" if p.directory_entries_max < 1 else "fallback_asks_per_s"
            raise ConfigError(f"peers.{key}", "must be > 0")
        if p.keep_fetched not in ("second", "always"):
            raise ConfigError("peers.keep_fetched", "must be second or always")
        if not p.borrow_s > 0:
            raise ConfigError("peers.borrow_s", "must be > 0")
        for key in ("deadline_ms", "fetch_timeout_ms", "fetch_inflight_max", "queue_max"):
            if getattr(p, key) < 1:
                raise ConfigError(f"peers.{key}", "must be >= 1")
        for key in ("fetch_bytes_max", "serve_bytes_max", "peer_bytes_inflight_max",
                    "serve_peer_bytes_max"):  # fmt: skip
            if getattr(p, key) < self.arena.page_bytes:
                raise ConfigError(f"peers.{key}", "must be at least one arena page")
        if p.negative_ttl_s < 0 or p.resolve_interval_s <= 0 or p.bench_s < 0:
            key = "negative_ttl_s" if p.negative_ttl_s < 0 else "resolve_interval_s"
            key = "bench_s" if p.bench_s < 0 else key
            raise ConfigError(f"peers.{key}", "out of range")

    def _validate_events(self) -> None:
        ev = self.events
        for key in ("endpoint", "replay_endpoint"):
            value = getattr(ev, key)
            if value and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"events.{key}", "must be tcp://, ipc:// or inproc:// (or empty)")
        if ev.replay_endpoint and not ev.endpoint:
            raise ConfigError("events.replay_endpoint", "needs events.endpoint")
        for key in ("hwm", "queue_max", "replay_batches_max", "replay_bytes_max",
                    "replay_requesters_max", "replay_requester_bytes_max",
                    "replay_requester_bytes_per_s"):  # fmt: skip
            if getattr(ev, key) < 1:
                raise ConfigError(f"events.{key}", "must be >= 1")
        for key in ("replay_requests_per_s", "replay_stall_s"):
            if not getattr(ev, key) > 0:
                raise ConfigError(f"events.{key}", "must be > 0")
        tcp = [k for k in ("endpoint", "replay_endpoint") if getattr(ev, k).startswith("tcp://")]
        p = self.peers
        insecure = ev.insecure or p.insecure
        if tcp and not insecure and not (p.curve_secret_key and p.curve_authorized_dir):
            raise ConfigError(
                f"events.{tcp[0]}",
                "tcp needs the fleet certificate (peers.curve_secret_key and "
                "peers.curve_authorized_dir), or events.insecure = true",
            )

    def is_size(self, key: str) -> bool:
        section, name = key.split(".", 1)
        return any(f.name == name and f.metadata.get("kind") == "size" for f in _fields(section))

    def resolved(self) -> dict[str, Any]:
        """Values chosen at start when a key is left empty: what the agent will use."""
        return {"agent.runtime_dir": str(self.runtime_dir), "arena.segment_name": self.segment_name}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for sec in SECTIONS:
            out[sec] = {f.name: getattr(getattr(self, sec), f.name) for f in _fields(sec)}
        return out


SECTIONS = ("agent", "arena", "disk", "s3", "promote", "metrics", "peers", "events")


def _fields(section: str) -> tuple[dataclasses.Field[Any], ...]:
    cls = Config.__dataclass_fields__[section].default_factory  # type: ignore[misc]
    return dataclasses.fields(cls)  # type: ignore[arg-type]


def _coerce(key: str, f: dataclasses.Field[Any], value: Any) -> Any:
    kind = f.metadata.get("kind")
    ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "size":
            return parse_size(value)
        if kind == "list":
            return parse_list(value)
        if ftype == "bool":
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if ftype == "int":
            return _integer(value)
        if ftype == "float":
            return _number(value)
        if ftype == "str":
            if not isinstance(value, (str, int, float)):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from exc
    raise ConfigError(key, f"unsupported type {ftype}")  # programmer error


def _integer(value: Any) -> int:
    """A whole number from TOML, the environment or a flag; the error says so in words
    (``int('abc')`` would say "invalid literal for int() with base 10")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip() if isinstance(value, (str, float)) else ""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if re.fullmatch(r"[+-]?\d+", text.replace("_", "")):
        return int(text.replace("_", ""))
    raise ValueError(f"expected a whole number (e.g. 8), got {value!r}")


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = math.nan
        if math.isfinite(out):
            return out
    raise ValueError(f"expected a number (e.g. 2.5), got {value!r}")


def _apply(cfg: Config, key: str, value: Any, source: str) -> None:
    if "." not in key:
        raise ConfigError(key, "unknown key (expected section.name)")
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(key, f"unknown section {section!r}")
    fields = {f.name: f for f in _fields(section)}
    if name not in fields:
        hint = _closest(name, {n: n for n in fields})
        raise ConfigError(
            key, "unknown key" + (f" (did you mean {section}.{hint}?)" if hint else "")
        )
    setattr(getattr(cfg, section), name, _coerce(key, fields[name], value))
    cfg.sources[key] = source


# KVNODE_* variables that are not agent keys: the config file's path and the vLLM
# connector's own settings (read in the vLLM processes, often from the same environment).
ENV_NOT_KEYS = ("KVNODE_CONFIG",)
ENV_OTHER_PREFIXES = ("KVNODE_CONNECTOR_",)


def env_keys(env: Mapping[str, str]) -> dict[str, str]:
    """``KVNODE_SECTION_NAME`` variables -> ``section.name``. A variable that names no
    key is refused like an unknown ``--set`` key, so a typo cannot go unnoticed."""
    known = {
        f"{ENV_PREFIX}{sec.upper()}_{f.name.upper()}": f"{sec}.{f.name}"
        for sec in SECTIONS
        for f in _fields(sec)
    }
    out: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in ENV_NOT_KEYS:
            continue
        if var.startswith(ENV_OTHER_PREFIXES):
            continue
        if var not in known:
            hint = _closest(var, known)
            raise ConfigError(
                var, "unknown environment variable" + (f" (did you mean {hint}?)" if hint else "")
            )
        out[var] = known[var]
    return out


def _closest(word: str, choices: Mapping[str, str]) -> str:
    import difflib

    got = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return got[0] if got else ""


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config. ``path=None`` reads DEFAULT_CONFIG_PATH if present."""
    cfg = Config()
    env = os.environ if env is None else env
    file_path = path or env.get("KVNODE_CONFIG") or None
    if file_path is None and Path(DEFAULT_CONFIG_PATH).is_file():
        file_path = DEFAULT_CONFIG_PATH
    if file_path:
        try:
            data = tomllib.loads(Path(file_path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError("--config", f"{file_path}: no such file") from exc
        except OSError as exc:
            raise ConfigError("--config", f"{file_path}: cannot read it ({exc.strerror})") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("--config", f"{file_path}: not valid TOML ({exc})") from exc
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(section, "expected a [section] table")
            for name, value in values.items():
                _apply(cfg, f"{section}.{name}", value, f"file:{file_path}")
    for var, key in env_keys(env).items():
        _apply(cfg, key, env[var], f"env:{var}")
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply(cfg, key, value, "flag")
    cfg.validate()
    return cfg
