"""The progress page: how the agent reports a job's progress into the worker's memory.

In agent mode each worker owns one page of ``slots`` job slots (plain memory in the
worker process, described in its export). The agent writes into a job's slot with the
same mover that moves the job's bytes, so on the CPU the completion lands in the same
system call as the data it follows (the kernel copies iovecs in order, and x86 keeps
stores in order). The worker reads its slots without a system call or a round trip.

A slot, ``slot_bytes`` long (``slot_bytes(num_layers)``)::

    [0]            done: the job's seq once every byte of the job is moved (or failed)
    [1]            result: RESULT_OK or RESULT_FAILED (valid once done)
    [8 .. 8+L)     layer i: the job's seq once layer i is moved (loads: readable)
    [8+L .. +C)    chunk c: its CHUNK_* outcome (valid once done; loads: once layer 0 is)
    [8+L+C .. +L)  computed i: written by the worker, not the agent: the job's seq once
                   the forward pass has written layer i (layer-wise saves: the agent
                   copies layer i only after it reads this byte)

Every byte is written whole (single-byte stores cannot tear) and carries the job's
``seq`` (1..255, per slot), so a byte left from the slot's previous job never reads as
this job's progress. The worker zeroes a slot before it hands the job over.
"""

from __future__ import annotations

from kvnode.ipc.protocol import JOB_CHUNKS_MAX

HEADER_BYTES = 8
DONE, RESULT = 0, 1
RESULT_OK, RESULT_FAILED = 0, 1

CHUNK_PENDING = 0
CHUNK_OK = 1
CHUNK_EXISTS = 2  # save: another writer has or is writing it (nothing copied)
CHUNK_NO_SPACE = 3  # save: the arena could not take it
CHUNK_MISSING = 4  # load: not in the arena
CHUNK_BAD = 5  # load: failed its checksum (dropped at the agent)
CHUNK_FAILED = 6  # the copy failed (worker memory gone, deadline, agent error)
CHUNK_CODES_MAX = CHUNK_FAILED


def slot_bytes(num_layers: int) -> int:
    """Bytes of one slot for a cache of ``num_layers`` layers, 64-byte aligned so
    neighbouring slots never share a cache line."""
    raw = HEADER_BYTES + 2 * num_layers + JOB_CHUNKS_MAX
    return (raw + 63) // 64 * 64


def layer_byte(layer: int) -> int:
    return HEADER_BYTES + layer


def chunk_byte(num_layers: int, chunk: int) -> int:
    return HEADER_BYTES + num_layers + chunk


def computed_byte(num_layers: int, layer: int) -> int:
    return HEADER_BYTES + num_layers + JOB_CHUNKS_MAX + layer
