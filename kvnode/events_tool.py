"""``kvnode events``: tails an agent's KV event stream (vLLM's wire format) in a
terminal, or as one JSON object a line.

The tool connects: ``--endpoint tcp://node7:7471`` tails node7's agent, and without
``--endpoint`` it tails this node's agent at its ``events.endpoint`` (a wildcard such
as ``tcp://*:7471`` is reached on 127.0.0.1). It binds only when asked (``--bind``):
then it is the collector an agent connects to (an agent whose ``events.endpoint`` names
a host rather than a wildcard). ``--replay-from N`` first asks the replay socket
(``events.replay_endpoint``) for every batch from sequence ``N``, then goes on with the
live stream, skipping batches the replay already showed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from kvnode.agent.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    events_curve,
    is_bind_endpoint,
    use_curve,
)
from kvnode.errors import ConfigError

POLL_MS = 200  # how often a quiet stream checks for Ctrl-C and --idle-exit
REPLAY_TIMEOUT_MS = 3000  # a replay socket that does not answer in this long is an error
END_SEQ = -1


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    ts: float
    events: list[Any]


def local_endpoint(endpoint: str) -> str:
    """The address this host reaches a socket at that was bound to ``endpoint``."""
    for wildcard in ("*", "0.0.0.0", "[::]"):
        endpoint = endpoint.replace(f"//{wildcard}:", "//127.0.0.1:")
    return endpoint


def open_stream(
    ctx: zmq.Context, endpoint: str, topic: str, bind: bool = False, curve: Any = None
) -> zmq.Socket:
    """A SUB socket on an agent's stream: connected to the PUB an agent binds, or
    bound (``bind``) as the collector agents connect to. ``curve``: the fleet
    certificate, which agents' tcp event sockets present unless ``events.insecure``."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if curve is not None and endpoint.startswith("tcp://"):
        use_curve(sub, curve, server=bind)
    try:
        if bind:
            sub.bind(endpoint)
        else:
            sub.connect(local_endpoint(endpoint))
    except zmq.ZMQError as exc:
        sub.close(0)
        how = "bind" if bind else "connect to"
        raise ConfigError("--endpoint", f"cannot {how} {endpoint}: {exc}") from None
    return sub


def decode(decoder: msgspec.msgpack.Decoder, frames: list[bytes]) -> Batch | None:
    """``[topic, seq, payload]`` as a Batch; None for a frame that is not one."""
    if len(frames) != 3 or len(frames[1]) != 8:
        return None
    try:
        batch = decoder.decode(frames[2])
    except msgspec.DecodeError:
        return None
    return Batch(int.from_bytes(frames[1], "big", signed=True), batch.ts, batch.events)


def replay(ctx: zmq.Context, endpoint: str, start_seq: int, curve: Any = None) -> Iterator[Batch]:
    """Every batch the agent still holds from ``start_seq`` on."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None and endpoint.startswith("tcp://"):
        use_curve(sock, curve, server=False)
    sock.setsockopt(zmq.RCVTIMEO, REPLAY_TIMEOUT_MS)
    sock.connect(local_endpoint(endpoint))
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    try:
        sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        while True:
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                raise ConfigError("events.replay_endpoint", f"no answer from {endpoint}") from None
            if len(frames) == 4 and int.from_bytes(frames[2], "big", signed=True) == END_SEQ:
                return
            got = decode(decoder, frames[1:])
            if got is not None:
                yield got
    finally:
        sock.close()


def event_dict(ev: Any) -> dict[str, Any]:
    """One event as plain JSON types: hashes as hex, the type's name under ``type``."""
    out: dict[str, Any] = {"type": type(ev).__name__}
    for name in ev.__struct_fields__:
        value = getattr(ev, name)
        if name == "block_hashes":
            value = [_hash(h) for h in value]
        elif name == "parent_block_hash":
            value = None if value is None else _hash(value)
        out[name] = value
    return out


def _hash(h: bytes | int) -> str | int:
    return h.hex() if isinstance(h, bytes) else h


def event_line(seq: int, ev: Any) -> str:
    """One event as a terminal line."""
    head = f"{seq:>8}  {type(ev).__name__:<16}"
    if isinstance(ev, BlockStored):
        parent = "-" if ev.parent_block_hash is None else str(_hash(ev.parent_block_hash))[:12]
        where = str(ev.medium) + (f"/{ev.ownership}" if ev.ownership else "")
        return (
            f"{head} {where:<12} {str(_hash(ev.block_hashes[0]))[:12]}  parent {parent:<12}  "
            f"{ev.block_size} tokens {ev.token_ids[:6]}{'...' if len(ev.token_ids) > 6 else ''}"
        )
    if isinstance(ev, BlockRemoved):
        where = str(ev.medium) + (f"/{ev.ownership}" if ev.ownership else "")
        return f"{head} {where:<12} {str(_hash(ev.block_hashes[0]))[:12]}"
    if isinstance(ev, AllBlocksCleared):
        return f"{head} everything this agent announced before is gone"
    return f"{head} {ev!r}"


class Printer:
    """Prints events, up to ``count`` (0: no limit). After a replay, live batches up to
    the last one replayed are skipped once (the two overlap); from the first newer one
    on, every batch is shown (a restarted agent numbers from 0 again)."""

    def __init__(self, as_json: bool, count: int, write: Callable[[str], None]) -> None:
        self.as_json = as_json
        self.left = count if count > 0 else -1
        self.last_seq = -1
        self.skip_to = -1
        self.write = write

    @property
    def done(self) -> bool:
        return self.left == 0

    def replayed(self, b: Batch) -> None:
        self.batch(b)
        self.skip_to = b.seq

    def batch(self, b: Batch) -> None:
        if self.skip_to >= 0:
            if b.seq <= self.skip_to:
                return
            self.skip_to = -1
        self.last_seq = b.seq
        for ev in b.events:
            if self.done:
                return
            if self.as_json:
                self.write(json.dumps({"seq": b.seq, "ts": b.ts, **event_dict(ev)}))
            else:
                self.write(event_line(b.seq, ev))
            if self.left > 0:
                self.left -= 1


def _settings(cfg: Any, args: argparse.Namespace) -> tuple[str, str, str]:
    ev = cfg.events
    endpoint = args.endpoint or ev.endpoint
    if not endpoint:
        raise ConfigError("events.endpoint", "events are off in the agent's configuration "
                          "(set events.endpoint there, or pass --endpoint)")  # fmt: skip
    if args.bind and not args.endpoint:
        raise ConfigError("--bind", "needs --endpoint (the address to collect on)")
    if not args.endpoint and not args.bind and not is_bind_endpoint(endpoint):
        raise ConfigError(
            "events.endpoint",
            f"this agent sends its events to a collector at {endpoint}; tail them there "
            f"(kvnode events --bind --endpoint {endpoint})",
        )
    replay_ep = args.replay_endpoint or ev.replay_endpoint
    if args.replay_from is not None and not replay_ep:
        raise ConfigError("events.replay_endpoint", "--replay-from needs a replay endpoint")
    topic = ev.topic if args.topic is None else args.topic
    return endpoint, replay_ep, topic


def run_events(cfg: Any, args: argparse.Namespace) -> int:
    endpoint, replay_ep, topic = _settings(cfg, args)

    def write(line: str) -> None:
        print(line, flush=True)

    printer = Printer(args.json, args.count, write)
    curve = events_curve(cfg)
    ctx = zmq.Context()
    try:
        sub = open_stream(ctx, endpoint, topic, bind=args.bind, curve=curve)
    except ConfigError:
        ctx.term()
        raise
    try:
        # Polling first hands the subscription to ZeroMQ, so it reaches the agent's
        # PUB before the replay ends: nothing published in between is missed.
        sub.poll(POLL_MS)
        if args.bind:
            note = f"listening on {endpoint} for agents to connect"
        else:
            note = f"connected to {local_endpoint(endpoint)} (events arrive once it publishes)"
        print(f"kvnode events: {note}", file=sys.stderr, flush=True)
        if args.replay_from is not None:
            for b in replay(ctx, replay_ep, args.replay_from, curve):
                printer.replayed(b)
        return _tail(sub, printer, args.idle_exit)
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()
        ctx.term()


def _tail(sub: zmq.Socket, printer: Printer, idle_exit_s: float | None) -> int:
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    last = time.monotonic()
    while not printer.done:
        if not sub.poll(POLL_MS):
            if idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                return 0
            continue
        last = time.monotonic()
        got = decode(decoder, sub.recv_multipart())
        if got is not None:
            printer.batch(got)
    return 0
