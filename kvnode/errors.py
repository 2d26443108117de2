"""Every error kvnode raises, in one place.

    KVNodeError
    ├── ConfigError            invalid configuration (names the key)
    ├── ProtocolError          a frame that does not decode, wrong version, unknown type
    ├── AgentUnavailable       no agent answered in time (absent, restarting, overloaded)
    ├── AgentError             the agent answered with an error reply
    │   └── ClientUnknown      the agent no longer knows this client (it restarted)
    ├── ArenaError             shared-memory segment could not be created or mapped
    ├── ChecksumError          bytes do not match their recorded checksum
    └── TierError              a lower tier failed (operating error, counted)
        ├── DiskError
        │   ├── DiskFull       ENOSPC / quota
        │   └── CorruptEntry   bad magic, version, header or checksum in a file/object
        ├── S3Error
        └── PeerError

Library errors (zmq, OSError, botocore) are mapped at the boundary to the most
specific class here with ``raise ... from exc``.
"""

from __future__ import annotations


class KVNodeError(Exception):
    """Base of every kvnode error."""


class ConfigError(KVNodeError):
    """Invalid configuration. ``key`` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key}: {message}")
        self.key = key


class ProtocolError(KVNodeError):
    """A message that cannot be decoded or is not allowed here."""


class AgentUnavailable(KVNodeError):
    """No agent answered within the timeout."""


class AgentError(KVNodeError):
    """The agent replied with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"agent error {code}: {message}")
        self.code = code


class ClientUnknown(AgentError):
    """The agent does not know this client id (it restarted or reclaimed us)."""


class ArenaError(KVNodeError):
    """The shared-memory arena could not be created, opened or mapped."""


class ChecksumError(KVNodeError):
    """Bytes do not match their checksum."""


class TierError(KVNodeError):
    """A cache tier below the arena failed."""


class DiskError(TierError):
    pass


class DiskFull(DiskError):
    pass


class CorruptEntry(DiskError):
    pass


class S3Error(TierError):
    pass


class PeerError(TierError):
    pass
