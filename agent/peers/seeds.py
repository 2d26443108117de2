"""Where peers are: ``tcp://HOST:PORT`` seeds as given, ``dns:NAME:PORT`` seeds
re-resolved on a timer (a headless Service lists a DaemonSet's pods)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("kvnode.peers")


def resolve_seeds(seeds: Sequence[str]) -> set[str]:
    """``tcp://HOST:PORT`` as given; ``dns:NAME:PORT`` as one endpoint per address the
    name resolves to now (a headless Service lists its pods). Blocking: resolver only."""
    out: set[str] = set()
    for seed in seeds:
        if seed.startswith("tcp://"):
            out.add(seed)
            continue
        name, _, port = seed[len("dns:") :].rpartition(":")
        try:
            infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.debug("peers: cannot resolve %s: %s", seed, exc)
            continue
        for family, *_, addr in infos:
            host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
            out.add(f"tcp://{host}:{port}")
    return out


class Resolver(threading.Thread):
    def __init__(
        self, seeds: Sequence[str], interval_s: float, publish: Callable[[set[str]], None]
    ):
        super().__init__(name="kvnode-peers-dns", daemon=True)
        self.seeds = list(seeds)
        self.interval_s = interval_s
        self.publish = publish
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.publish(resolve_seeds(self.seeds))
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()


__all__ = ["Resolver", "resolve_seeds"]
