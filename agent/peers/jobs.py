"""The jobs the loop hands the network thread: a lookup (``Query``) asks every usable
peer which keys it holds; a fetch (``Fetch``) brings one peer's chunks into pages the
loop reserved. The network thread fills them in and hands them back; only the loop
turns them into index changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(slots=True, eq=False)
class Query:
    keys: list[bytes]
    parents: list[bytes | None]
    started: float = 0.0
    deadline: float = 0.0
    waiting: set[str] = field(default_factory=set)
    best: str = ""  # endpoint holding the longest prefix
    sizes: list[int] = field(default_factory=list)  # of that prefix
    promoting: set[bytes] = field(default_factory=set)  # keys a peer's lower tier is promoting
    targets: list[str] = field(default_factory=list)  # peers to ask ([]: every peer)
    holder: str = ""  # the one peer the directory named as holding the keys
    answered: set[str] = field(default_factory=set)  # peers whose answer was read
    done: bool = False


@dataclass(slots=True, eq=False)
class Fetch:
    """Nothing is reserved for a fetch until its bytes have arrived and been checked:
    the network thread keeps each key's payload (views of the received frames) and
    the loop then reserves pages (which may evict), copies and lands it."""

    peer: str
    keys: list[bytes]
    parents: list[bytes | None]
    sizes: list[int]  # what the peer said it holds; a reply must match
    tokens: list[list[int]]
    payload: list[list[memoryview] | None] = field(default_factory=list)  # None: not landed
    checksums: list[int] = field(default_factory=list)  # the writer's (0: unverified)
    frames: list[object] = field(default_factory=list)  # keeps ``payload``'s memory alive
    started: float = 0.0
    deadline: float = 0.0
    done: bool = False

    def __post_init__(self) -> None:
        self.payload = [None] * len(self.keys)
        self.checksums = [0] * len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


Job = Union[Query, Fetch]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A chunk committed into the arena from a peer (for events and write-through)."""

    key: bytes
    parent: bytes | None
    tokens: list[int]
    size: int


__all__ = ["Fetch", "Fetched", "Job", "Query"]
