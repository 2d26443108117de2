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
    done: bool = False


@dataclass(slots=True, eq=False)
class Fetch:
    peer: str
    keys: list[bytes]
    parents: list[bytes | None]
    sizes: list[int]
    slots: list[list[memoryview]]  # the reserved arena pages of each key
    checksums: list[int]  # verified checksum per key; 0 = not landed
    tokens: list[list[int]]
    started: float = 0.0
    deadline: float = 0.0
    done: bool = False


Job = Union[Query, Fetch]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A chunk committed into the arena from a peer (for events and write-through)."""

    key: bytes
    parent: bytes | None
    tokens: list[int]
    size: int


__all__ = ["Fetch", "Fetched", "Job", "Query"]
