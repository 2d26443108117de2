"""The on-disk and in-object format of one cached chunk, shared by the disk and S3 tiers.

    offset 0        header struct (132 bytes), then zeros up to HEADER_BYTES
    HEADER_BYTES    payload (``stored_bytes`` bytes; lz4 frame when codec is LZ4)

The header is padded to 4 KiB so the payload starts on a boundary that O_DIRECT
accepts. It carries its own checksum; the payload checksum is xxh3-64 of the decoded
payload, the same value a client records at commit, so one number follows a chunk
through every tier. A chunk committed without one is flagged ``FLAG_UNVERIFIED``: the
header's checksum then guards only the tier's own copy, and readers are handed 0, so
the chunk stays unverified wherever it goes. Every writer encodes *and decodes back* the header before writing
(pair check); every reader decodes and verifies after reading.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import xxhash

from kvnode.errors import CorruptEntry
from kvnode.ipc.checksum import checksum

MAGIC = b"KVNT"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
KEY_BYTES_MAX = 64
FINGERPRINT_BYTES = 16
NO_FINGERPRINT = bytes(FINGERPRINT_BYTES)

FLAG_UNVERIFIED = 1  # the writer gave no checksum: the header's is the tier's own

CODEC_NONE = 0
CODEC_LZ4 = 1
CODECS = {"none": CODEC_NONE, "lz4": CODEC_LZ4}
_CODEC_IDS = frozenset(CODECS.values())

# magic, version, codec, key_len, flags, stored_bytes, raw_bytes, checksum,
# created_ns, fingerprint, key; then the header checksum over all of these.
_BODY = struct.Struct("<4sHBBIQQQQ16s64s")
_SUM = struct.Struct("<Q")
HEADER_STRUCT_BYTES = _BODY.size + _SUM.size


# Optional chunk metadata in the header's padding (files without it read as before):
# magic, parent length, token count, parent (16 bytes), tokens (uint32 LE); then xxh3-64.
META_OFFSET = 512
_META = struct.Struct("<4sHH16s")
META_MAGIC = b"KVTM"
TOKENS_MAX = (HEADER_BYTES - META_OFFSET - _META.size - _SUM.size) // 4


@dataclass(slots=True, frozen=True)
class ChunkMeta:
    """What a chunk's KV events need: the previous chunk's key (b"" for a prompt's
    first chunk) and the chunk's token ids (uint32 little-endian)."""

    parent: bytes = b""
    tokens: bytes = b""

    @classmethod
    def of(cls, parent: bytes | None, token_ids: list[int]) -> ChunkMeta | None:
        if not parent and not token_ids:
            return None
        if len(token_ids) > TOKENS_MAX or len(parent or b"") > FINGERPRINT_BYTES:
            return None  # too much to keep: events go without it
        return cls(parent or b"", struct.pack(f"<{len(token_ids)}I", *token_ids))

    def token_ids(self) -> list[int]:
        return list(struct.unpack(f"<{len(self.tokens) // 4}I", self.tokens))


def encode_meta(meta: ChunkMeta) -> bytes:
    n = len(meta.tokens) // 4
    body = _META.pack(META_MAGIC, len(meta.parent), n, meta.parent.ljust(16, b"\0")) + meta.tokens
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def decode_meta(block: bytes | bytearray | memoryview) -> ChunkMeta | None:
    """The metadata in a whole header block, or None when absent or damaged (metadata
    is advisory: a damaged block never makes the chunk unreadable)."""
    if len(block) < META_OFFSET + _META.size + _SUM.size:
        return None
    magic, plen, n, parent = _META.unpack_from(block, META_OFFSET)
    if magic != META_MAGIC or plen > 16 or n > TOKENS_MAX:
        return None
    end = META_OFFSET + _META.size + 4 * n
    body = bytes(block[META_OFFSET:end])
    if len(block) < end + _SUM.size or _SUM.unpack_from(block, end)[0] != xxhash.xxh3_64_intdigest(
        body
    ):
        return None
    return ChunkMeta(parent[:plen], body[_META.size :])


@dataclass(slots=True, frozen=True)
class Header:
    key: bytes
    raw_bytes: int
    stored_bytes: int
    checksum: int
    codec: int = CODEC_NONE
    fingerprint: bytes = NO_FINGERPRINT
    created_ns: int = 0
    version: int = FORMAT_VERSION
    verified: bool = True  # False: the writer gave no checksum (FLAG_UNVERIFIED)

    @property
    def total_bytes(self) -> int:
        """Size of the whole file or object."""
        return HEADER_BYTES + self.stored_bytes


def make_header(
    key: bytes,
    raw_bytes: int,
    stored_bytes: int,
    payload_checksum: int,
    codec: int = CODEC_NONE,
    fingerprint: bytes = NO_FINGERPRINT,
    verified: bool = True,
) -> Header:
    return Header(
        key, raw_bytes, stored_bytes, payload_checksum, codec, fingerprint, time.time_ns(),
        verified=verified,
    )  # fmt: skip


def encode_header(h: Header) -> bytes:
    """The header struct (HEADER_STRUCT_BYTES). Decoded back before it is returned."""
    if not 0 < len(h.key) <= KEY_BYTES_MAX:
        raise ValueError(f"key must be 1..{KEY_BYTES_MAX} bytes")
    if len(h.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError("fingerprint must be 16 bytes")
    if h.codec not in CODECS.values():
        raise ValueError(f"unknown codec {h.codec}")
    body = _BODY.pack(
        MAGIC,
        h.version,
        h.codec,
        len(h.key),
        0 if h.verified else FLAG_UNVERIFIED,
        h.stored_bytes,
        h.raw_bytes,
        h.checksum,
        h.created_ns,
        h.fingerprint,
        h.key,
    )
    raw = body + _SUM.pack(xxhash.xxh3_64_intdigest(body))
    # Pair check: what we are about to write must read back as what we meant.
    if decode_header(raw) != h:
        raise CorruptEntry("header does not survive its own round trip")
    return raw


def header_block(h: Header, meta: ChunkMeta | None = None) -> bytes:
    """The header padded to HEADER_BYTES, as written in front of the payload, with the
    chunk's metadata in the padding when given."""
    raw = encode_header(h)
    if meta is None:
        return raw.ljust(HEADER_BYTES, b"\0")
    block = raw.ljust(META_OFFSET, b"\0") + encode_meta(meta)
    return block.ljust(HEADER_BYTES, b"\0")


def decode_header(buf: bytes | bytearray | memoryview, key: bytes | None = None) -> Header:
    """Parse and verify a header; ``key`` (when given) must match. Raises CorruptEntry."""
    if len(buf) < HEADER_STRUCT_BYTES:
        raise CorruptEntry("truncated header")
    raw = bytes(buf[:HEADER_STRUCT_BYTES])
    body = raw[: _BODY.size]
    (magic, version, codec, key_len, flags, stored, raw_len, csum, created, fp, key_pad) = (
        _BODY.unpack(body)
    )
    if magic != MAGIC:
        raise CorruptEntry("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version} (want {FORMAT_VERSION})")
    if _SUM.unpack(raw[_BODY.size :])[0] != xxhash.xxh3_64_intdigest(body):
        raise CorruptEntry("header checksum mismatch")
    if codec not in _CODEC_IDS or not 0 < key_len <= KEY_BYTES_MAX:
        raise CorruptEntry("bad codec or key length")
    if codec == CODEC_NONE and stored != raw_len:
        raise CorruptEntry("stored and raw lengths differ without a codec")
    if flags & ~FLAG_UNVERIFIED:
        raise CorruptEntry("unknown header flags")
    h = Header(
        key_pad[:key_len], raw_len, stored, csum, codec, fp, created, version,
        verified=not flags & FLAG_UNVERIFIED,
    )  # fmt: skip
    if key is not None and h.key != key:
        raise CorruptEntry("header names another key")
    return h


__all__ = [
    "ChunkMeta",
    "decode_meta",
    "CODECS",
    "CODEC_LZ4",
    "CODEC_NONE",
    "FLAG_UNVERIFIED",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "Header",
    "NO_FINGERPRINT",
    "checksum",
    "decode_header",
    "encode_header",
    "header_block",
    "make_header",
]
