"""Chunk keys: format, stability across processes, namespace separation, prefixes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvnode.connector.keys import KEY_BYTES, Namespace, chunk_keys

NS = Namespace(
    model="org/model@rev1",
    dtype="bfloat16",
    kv_layout="flash",
    block_shape=(2, 16, 8, 128),
    block_size=16,
    chunk_tokens=32,
    tp_size=2,
    tp_rank=1,
    pp_rank=0,
)
TOKENS = [(i * 7919 + 13) % 151_000 for i in range(100)]  # 3 full chunks + 4 tokens

# Computed once from the format above; a change here changes every cached key.
GOLDEN_FINGERPRINT = "83baae3d8dbb7fcd5190220c81932496"
GOLDEN_KEYS = [
    "e03bfdd4729505214af7450fba9f7e0f",
    "4fe1dc6b65479c3f362fe2997d0ca768",
    "bdfa85914cbda4a5f2b7017846485757",
]


def test_golden_vector() -> None:
    assert NS.fingerprint().hex() == GOLDEN_FINGERPRINT
    assert [k.hex() for k in chunk_keys(NS, TOKENS)] == GOLDEN_KEYS


# The same namespace naming a KV cache group (hybrid models): other keys, fixed here too.
GROUP = "sliding_window:w=4096:n=12:l=00112233445566ff"
GOLDEN_GROUP_FINGERPRINT = "16308b2e36f21edbb616a89339a870ce"
GOLDEN_GROUP_KEYS = [
    "05e15b7df59f4a5ce89a72d68416f27d",
    "d6b0a1b48425df30e238b89a31812192",
    "a61dca4fc612156e36d340dcae35fcd5",
]


def test_group_golden_vector() -> None:
    grouped = NS.with_group(GROUP)
    assert grouped.fingerprint().hex() == GOLDEN_GROUP_FINGERPRINT
    assert [k.hex() for k in chunk_keys(grouped, TOKENS)] == GOLDEN_GROUP_KEYS
    # No group: the bytes (and so the keys already stored) of before groups existed.
    assert NS.with_group("").canonical_bytes() == NS.canonical_bytes()
    assert NS.with_group("").fingerprint().hex() == GOLDEN_FINGERPRINT


def test_key_shape_and_chain() -> None:
    import xxhash

    keys = chunk_keys(NS, TOKENS)
    assert len(keys) == 3 and all(len(k) == KEY_BYTES for k in keys)
    first = np.asarray(TOKENS[:32], dtype="<u4").tobytes()
    assert keys[0] == xxhash.xxh3_128_digest(NS.fingerprint() + first)
    second = np.asarray(TOKENS[32:64], dtype="<u4").tobytes()
    assert keys[1] == xxhash.xxh3_128_digest(keys[0] + second)


_CHILD = """
import sys
from kvnode.connector.keys import Namespace, chunk_keys
ns = Namespace(*{fields!r})
print(ns.fingerprint().hex(), *(k.hex() for k in chunk_keys(ns, {tokens!r})))
"""


@pytest.mark.parametrize("seed", ["0", "1", "12345", "random"])
def test_same_keys_in_other_processes(seed: str) -> None:
    fields = [getattr(NS, f.name) for f in dataclasses.fields(NS)]
    code = _CHILD.format(fields=fields, tokens=TOKENS)
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    want = [NS.fingerprint().hex(), *(k.hex() for k in chunk_keys(NS, TOKENS))]
    assert out.stdout.split() == want


@pytest.mark.parametrize(
    "change",
    [
        {"model": "org/model@rev2"},
        {"dtype": "float16"},
        {"kv_layout": "flash_hnd"},
        {"block_shape": (2, 16, 8, 64)},
        {"block_size": 32},
        {"chunk_tokens": 64},
        {"tp_size": 4},
        {"tp_rank": 0},
        {"pp_rank": 1},
        {"extras": ("lora:7",)},
        {"extras": ("salt:abc",)},
        {"extras": ("mm:1", "mm:2")},
        {"group": "full_attention:n=1:l=0"},
        {"group": "sliding_window:w=512:n=1:l=0"},
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values()))),
)
def test_every_field_changes_every_key(change: dict[str, object]) -> None:
    other = dataclasses.replace(NS, **change)
    # Same chunk length for the comparison; only the namespace differs.
    mine, theirs = chunk_keys(NS, TOKENS, 32), chunk_keys(other, TOKENS, 32)
    assert other.fingerprint() != NS.fingerprint()
    assert all(a != b for a, b in zip(mine, theirs, strict=True))


def test_field_boundaries_are_unambiguous() -> None:
    a = dataclasses.replace(NS, model="ab", dtype="c")
    b = dataclasses.replace(NS, model="a", dtype="bc")
    assert a.fingerprint() != b.fingerprint()
    c = NS.with_extras(["x", "y"])
    d = NS.with_extras(["xy"])
    e = NS.with_extras(["y", "x"])
    assert len({c.fingerprint(), d.fingerprint(), e.fingerprint()}) == 3


def test_with_rank_and_extras() -> None:
    assert NS.with_rank(0) == dataclasses.replace(NS, tp_rank=0)
    assert NS.with_rank(1) == NS
    assert NS.with_extras(iter(["a"])).extras == ("a",)
    assert NS.with_extras([]) == NS


@settings(max_examples=50, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 2**32 - 1), max_size=200),
    more=st.lists(st.integers(0, 2**32 - 1), max_size=100),
)
def test_prefix_property(prompt: list[int], more: list[int]) -> None:
    keys = chunk_keys(NS, prompt)
    longer = chunk_keys(NS, prompt + more)
    assert longer[: len(keys)] == keys
    assert len(keys) == len(prompt) // NS.chunk_tokens


def test_partial_trailing_chunk_is_not_keyed() -> None:
    assert chunk_keys(NS, TOKENS[:31]) == []
    assert len(chunk_keys(NS, TOKENS[:32])) == 1
    assert chunk_keys(NS, TOKENS[:63]) == chunk_keys(NS, TOKENS[:32])
    assert chunk_keys(NS, TOKENS, chunk_tokens=50) == chunk_keys(NS, TOKENS[:100], 50)
    assert len(chunk_keys(NS, TOKENS, chunk_tokens=50)) == 2


def test_changed_token_changes_that_chunk_and_later_ones() -> None:
    edited = list(TOKENS)
    edited[40] += 1
    a, b = chunk_keys(NS, TOKENS), chunk_keys(NS, edited)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]


def test_token_containers_agree() -> None:
    want = chunk_keys(NS, TOKENS)
    assert chunk_keys(NS, tuple(TOKENS)) == want
    assert chunk_keys(NS, np.asarray(TOKENS, dtype=np.int64)) == want
    assert chunk_keys(NS, np.asarray(TOKENS, dtype=np.uint32)) == want
    assert chunk_keys(NS, np.asarray(TOKENS, dtype=np.int32)) == want


@pytest.mark.parametrize("bad", [[-1] * 32, [2**32] * 32])
def test_tokens_outside_uint32_are_refused(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        chunk_keys(NS, bad)
    with pytest.raises(ValueError):
        chunk_keys(NS, np.asarray(bad, dtype=np.int64))


@pytest.mark.parametrize(
    "change",
    [
        {"chunk_tokens": 24},  # not a multiple of block_size
        {"block_size": 0},
        {"tp_rank": 2},
        {"pp_rank": -1},
        {"extras": (b"bytes",)},
    ],
)
def test_bad_namespaces(change: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(NS, **change)


def test_long_prompt_is_fast() -> None:
    import time

    tokens = list(range(128 * 1024))
    start = time.perf_counter()
    keys = chunk_keys(dataclasses.replace(NS, chunk_tokens=256), tokens)
    assert len(keys) == 512
    assert time.perf_counter() - start < 1.0  # measured about 5 ms
