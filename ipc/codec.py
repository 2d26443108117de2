"""Frames of kvnode's wire protocols: one version byte, then one msgpack-encoded tagged
struct (msgspec, array-like). The local control plane (``kvnode.ipc.protocol``) and the
peer links (``kvnode.agent.peers.wire``) share this codec; each has its own version and
message set.

Decoding is total: any input either becomes a message whose every field is within the
bounds its schema declares, or raises ``ProtocolError``. Nothing is pickled.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvnode.errors import ProtocolError

_encoder = msgspec.msgpack.Encoder()


class Codec:
    """Encoder and decoder of one protocol version and one message union (``what``
    names the direction in error messages: "request", "peer reply", ...)."""

    __slots__ = ("version", "what", "_prefix", "_decoder")

    def __init__(self, version: int, union: Any, what: str) -> None:
        if not 0 < version < 256:
            raise ValueError(f"protocol version {version} does not fit one byte")
        self.version = version
        self.what = what
        self._prefix = bytes([version])
        self._decoder = msgspec.msgpack.Decoder(union)

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._prefix + _encoder.encode(msg)

    def decode(self, frame: bytes | memoryview) -> Any:
        # Hot path (every request and reply): no imports or calls beyond the checks.
        if len(frame) < 2:
            raise ProtocolError("truncated frame")
        if frame[0] != self.version:
            raise ProtocolError(f"protocol version {frame[0]} not supported (want {self.version})")
        try:
            return self._decoder.decode(memoryview(frame)[1:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"bad {self.what}: {exc}") from exc
        except (UnicodeDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise ProtocolError(f"bad {self.what}: {type(exc).__name__}") from exc


__all__ = ["Codec"]
