"""Pin a mapped host buffer (the shared-memory arena) for DMA with the GPU.

``cudaHostRegister`` (``hipHostRegister`` under ROCm, through the same torch binding)
turns an existing mapping into page-locked memory, so copies between the GPU and
tensors viewing the arena run as DMA instead of through a bounce buffer. Without a GPU
there is nothing to do and the handle is None. A refused registration (e.g. a low
``RLIMIT_MEMLOCK``) is an operating error: copies still work, only slower, so it is
logged and answered with None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

_HOST_REGISTER_PORTABLE = 1  # visible to every CUDA context, not only the current one


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
    err = torch.cuda.cudart().cudaHostRegister(address, nbytes, _HOST_REGISTER_PORTABLE)
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
