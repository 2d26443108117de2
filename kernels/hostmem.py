"""Pin a mapped host buffer (the shared-memory arena) for DMA with the GPU.

``cudaHostRegister`` (``hipHostRegister`` under ROCm, through the same torch binding)
turns an existing mapping into page-locked memory, so copies between the GPU and
tensors viewing the arena run as DMA instead of through a bounce buffer. Without a GPU
there is nothing to do and the handle is None. A refused registration (e.g. a low
``RLIMIT_MEMLOCK``) is an operating error: copies still work, only slower, so it is
logged and answered with None.

``ArenaMapping`` is what a worker hands to ``AgentClient(on_map=..., on_unmap=...)``:
the client owns the mapping and tells it of every (re)mapping, so the page tables are
populated and the registration follows the client through agent restarts
(map -> populate -> register -> use -> unregister -> unmap). Copies run inside
``ArenaMapping.use(epoch)``, which an unmapping waits for, and which refuses slots
granted before the latest (re)mapping.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_HOST_REGISTER_PORTABLE = 1  # visible to every CUDA context, not only the current one
# Mapped into the devices' address space: kernels (the one-launch copy's direct route)
# read and write it at the same address as the host does (unified addressing).
_HOST_REGISTER_MAPPED = 2
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; not in Python 3.11's mmap module


class StaleMapping(Exception):
    """The arena was unmapped or remapped (agent restart) since the slot was granted."""


@dataclass(frozen=True, slots=True)
class HostRegistration:
    address: int
    nbytes: int


def register_host_memory(buf: object) -> HostRegistration | None:
    """Page-lock ``buf`` (an mmap, memoryview or other writable buffer) for the GPU."""
    if not torch.cuda.is_available():
        return None
    view = np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]
    address, nbytes = int(view.ctypes.data), int(view.nbytes)
    del view  # holding the export would stop the owner from closing the mmap
    if nbytes == 0:
        return None
    err = torch.cuda.cudart().cudaHostRegister(
        address, nbytes, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
    )
    if int(err) != 0:
        log.warning(
            "cudaHostRegister of %d bytes failed (error %s); copies will be slower", nbytes, err
        )
        return None
    return HostRegistration(address, nbytes)


def unregister_host_memory(handle: HostRegistration | None) -> None:
    """Undo ``register_host_memory``; call before the buffer is unmapped."""
    if handle is None:
        return
    err = torch.cuda.cudart().cudaHostUnregister(handle.address)
    if int(err) != 0:
        log.warning("cudaHostUnregister failed (error %s)", err)


def populate(buf: object) -> None:
    """Map every page of ``buf`` now: a first touch per page during a copy costs about
    ten times the copy. Through ctypes, which lets go of the GIL: a large arena takes a
    while and vLLM's threads must not wait on it. Best effort."""
    try:
        view = np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]
        address, nbytes = int(view.ctypes.data), int(view.nbytes)
        del view  # holding the export would stop the owner from unmapping it
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(address, nbytes, _MADV_POPULATE_WRITE) != 0:
            log.debug("madvise(POPULATE_WRITE) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError, ValueError, TypeError) as exc:
        log.debug("arena not pre-mapped: %s", exc)  # first touch maps it instead


class ArenaMapping:
    """The arena as the worker may use it: populated, registered for DMA, and valid.

    ``epoch`` changes on every map and unmap. A caller reads it before the call that
    grants slots (pin/reserve) and after it: equal values mean the slots belong to the
    current mapping. ``use(epoch)`` then holds the mapping for the copies; an unmap
    waits until they are done, so nothing is unregistered or unmapped under a copy.

    ``lazy``: a worker whose bytes the agent moves (agent mode) copies nothing itself
    unless it falls back to worker mode, so its mapping is populated and registered
    at its first ``use`` instead of at every (re)mapping (populating a large arena
    costs each worker page tables; registering it, seconds of pinning on a GPU).
    """

    def __init__(
        self,
        register: Callable[[object], Any] = register_host_memory,
        unregister: Callable[[Any], None] = unregister_host_memory,
        prepare: Callable[[object], None] = populate,
        lazy: bool = False,
    ) -> None:
        self._register = register
        self._unregister = unregister
        self._prepare = prepare
        self.lazy = lazy
        self._lock = threading.RLock()
        self._buf: object = None  # mapped, not populated or registered yet (lazy)
        self._view: memoryview | None = None
        self._handle: Any = None
        self.epoch = 0

    def on_map(self, buf: object) -> None:
        """The client mapped ``buf`` (a new generation's arena): make it ready (or,
        when lazy, note it for the first ``use``)."""
        handle = None
        if not self.lazy:
            self._prepare(buf)
            handle = self._register(buf)
        with self._lock:
            self._view = memoryview(buf).cast("B")  # type: ignore[arg-type]
            self._handle = handle
            self._buf = buf if self.lazy else None
            self.epoch += 1

    def on_unmap(self, buf: object) -> None:
        """The client is about to unmap ``buf``: wait for copies, unregister, let go."""
        # Before waiting for the lock: a copy in progress already sees the change, so
        # its caller neither commits nor drops anything in the next generation.
        self.epoch += 1
        with self._lock:
            view, self._view = self._view, None
            handle, self._handle = self._handle, None
            self._buf = None
            if handle is not None:
                self._unregister(handle)
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    pass  # an array still views it: the mapping outlives it, then goes

    @contextmanager
    def use(self, epoch: int) -> Iterator[memoryview]:
        """The mapping, held for the block; ``StaleMapping`` if it changed since ``epoch``."""
        with self._lock:
            if self._view is None or self.epoch != epoch:
                raise StaleMapping(f"arena remapped (epoch {epoch} -> {self.epoch})")
            self._ready_locked()  # lazy: the first copy of this mapping readies it
            yield self._view

    def ready_now(self) -> None:
        """A worker that copies itself after all: ready the mapping now, not at its
        first copy, and every later mapping as it is made (eager from now on)."""
        with self._lock:
            self.lazy = False
            self._ready_locked()

    def _ready_locked(self) -> None:
        if self._buf is None or self._view is None:
            return
        buf, self._buf = self._buf, None
        t0 = time.perf_counter()
        self._prepare(buf)
        self._handle = self._register(buf)
        log.info(
            "kvnode: arena of %d bytes readied for worker-mode copies in %.2f s",
            len(self._view), time.perf_counter() - t0,
        )  # fmt: skip
