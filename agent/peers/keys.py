"""CURVE credentials of a fleet: the shared certificate and the authorized public keys.

A fleet shares one certificate: it is every agent's server key and client key. A ZAP
handler admits only client keys found in ``curve_authorized_dir`` and counts refusals.
CURVE authenticates membership; members are trusted for content (see docs/peers.md).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from kvnode.errors import ConfigError

log = logging.getLogger("kvnode.peers")


class KeyRing:
    """ZAP credentials provider: admits client keys found in the authorized directory
    and counts who it refuses. Called from the authenticator's thread."""

    def __init__(self, authorized_dir: str) -> None:
        self.authorized_dir = authorized_dir
        self._lock = threading.Lock()
        self.allowed = 0
        self.refused = 0
        self.keys: frozenset[bytes] = frozenset()
        self.reload()

    def reload(self) -> int:
        """Read the directory again (key rotation). Returns the number of keys."""
        if not Path(self.authorized_dir).is_dir():
            raise ConfigError(
                "peers.curve_authorized_dir", f"{self.authorized_dir}: no such directory"
            )
        self.keys = frozenset(zmq.auth.load_certificates(self.authorized_dir))
        return len(self.keys)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        with self._lock:
            if ok:
                self.allowed += 1
            else:
                self.refused += 1
        if not ok:
            log.warning("peer refused: unknown CURVE client key %s", key.decode(errors="replace"))
        return ok


@dataclass(frozen=True, slots=True)
class Curve:
    """The fleet certificate (z85) and the server keys outgoing links may meet: our own
    public key first, then the other authorized keys (a rotation in progress)."""

    public: bytes
    secret: bytes
    ring: KeyRing

    @classmethod
    def load(cls, secret_path: str, authorized_dir: str) -> Curve:
        try:
            public, secret = zmq.auth.load_certificate(secret_path)
        except (OSError, ValueError) as exc:
            raise ConfigError("peers.curve_secret_key", f"{secret_path}: {exc}") from exc
        if not secret:
            raise ConfigError("peers.curve_secret_key", f"{secret_path}: no secret key in it")
        return cls(public, secret, KeyRing(authorized_dir))

    def server_keys(self) -> list[bytes]:
        return [self.public, *sorted(k for k in self.ring.keys if k != self.public)]
