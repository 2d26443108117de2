"""Chunk keys: chained content hashes of full chunks of tokens, per namespace.

``key_i = xxh3_128(key_{i-1} || tokens of chunk i as little-endian uint32)`` with
``key_{-1} = Namespace.fingerprint()``. Everything hashed is canonical bytes (length
prefixed UTF-8, little-endian integers), never Python's ``hash()`` or pickle, so every
process, restart and node computes the same keys. A key names its whole prefix, so
the keys of a prompt are a prefix of the keys of any longer prompt that starts with it.
Changing the byte format changes every key: bump ``_FORMAT`` when it happens.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

KEY_BYTES = 16
_FORMAT = b"kvnode-namespace-v1\x00"
_GROUP_TAG = b"group\x00"  # only after the fields every namespace has
_TOKEN_MAX = 2**32 - 1
_U32 = np.dtype("<u4")
if array("I").itemsize != 4:
    raise ImportError("array('I') is not 32-bit on this platform")


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes cached KV bytes incompatible between two requests."""

    model: str
    dtype: str
    kv_layout: str
    block_shape: tuple[int, ...]
    block_size: int
    chunk_tokens: int
    tp_size: int
    tp_rank: int
    pp_rank: int
    extras: tuple[str, ...] = ()  # LoRA name/id, cache_salt, multimodal hashes, in order
    # The KV cache group (kind, window, layers; connector/groups.py). Empty for a model
    # whose cache is one plain full-attention group: its bytes, and so the keys already
    # in every tier, are exactly those from before groups were named.
    group: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_shape", tuple(int(d) for d in self.block_shape))
        object.__setattr__(self, "extras", tuple(self.extras))
        for text in (self.model, self.dtype, self.kv_layout, *self.extras, self.group):
            if not isinstance(text, str):
                raise TypeError(f"namespace text fields must be str, got {text!r}")
        if self.block_size <= 0 or self.chunk_tokens <= 0:
            raise ValueError(f"block_size and chunk_tokens must be > 0: {self}")
        if self.chunk_tokens % self.block_size:
            raise ValueError(
                f"chunk_tokens {self.chunk_tokens} is not a multiple of block_size {self.block_size}"
            )
        if not 0 <= self.tp_rank < self.tp_size or self.pp_rank < 0:
            raise ValueError(f"bad ranks: tp {self.tp_rank}/{self.tp_size}, pp {self.pp_rank}")

    def canonical_bytes(self) -> bytes:
        parts = [_FORMAT]
        for text in (self.model, self.dtype, self.kv_layout):
            parts.append(_text(text))
        parts.append(_ints(self.block_shape))
        parts.append(
            struct.pack(
                "<5q", self.block_size, self.chunk_tokens, self.tp_size, self.tp_rank, self.pp_rank
            )
        )
        parts.append(struct.pack("<I", len(self.extras)))
        parts.extend(_text(e) for e in self.extras)
        if self.group:
            parts.append(_GROUP_TAG + _text(self.group))
        return b"".join(parts)

    def fingerprint(self) -> bytes:
        """16 bytes naming this namespace; the seed of every chunk key chain."""
        return xxhash.xxh3_128_digest(self.canonical_bytes())

    def with_rank(self, tp_rank: int) -> Namespace:
        return dataclasses.replace(self, tp_rank=tp_rank)

    def with_extras(self, extras: Iterable[str]) -> Namespace:
        return dataclasses.replace(self, extras=tuple(extras))

    def with_group(self, group: str) -> Namespace:
        return dataclasses.replace(self, group=group)


def chunk_keys(
    ns: Namespace, token_ids: Sequence[int] | np.ndarray, chunk_tokens: int | None = None
) -> list[bytes]:
    """One 16-byte key per FULL chunk of ``token_ids``; a partial last chunk has none."""
    step = ns.chunk_tokens if chunk_tokens is None else chunk_tokens
    if step <= 0:
        raise ValueError(f"chunk_tokens must be > 0, not {step}")
    count = len(token_ids) // step
    if count == 0:
        return []
    data = _token_bytes(token_ids, count * step)
    chunk_nbytes = 4 * step
    keys: list[bytes] = []
    key = ns.fingerprint()
    digest = xxhash.xxh3_128_digest
    for start in range(0, len(data), chunk_nbytes):
        key = digest(key + data[start : start + chunk_nbytes])
        keys.append(key)
    return keys


def _token_bytes(token_ids: Sequence[int] | np.ndarray, count: int) -> bytes:
    if isinstance(token_ids, np.ndarray):
        arr = token_ids[:count]
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"token ids must be 1-D ints, got {arr.dtype} {arr.shape}")
        if arr.dtype != _U32 and arr.size and (arr.min() < 0 or arr.max() > _TOKEN_MAX):
            raise ValueError("token ids must fit in uint32")
        return arr.astype(_U32, copy=False).tobytes()
    # array("I") converts a list of ints about 3x faster than numpy does.
    try:
        packed = array("I", token_ids[:count])
    except OverflowError as exc:
        raise ValueError("token ids must fit in uint32") from exc
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _ints(values: tuple[int, ...]) -> bytes:
    return struct.pack(f"<I{len(values)}q", len(values), *values)
