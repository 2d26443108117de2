"""Device staging buffers for multi-layer copies: one per (device, stream), reused.

A chunk of every layer is packed into one staging buffer on the device, so it crosses
the host link in one copy. Reuse needs no events: every user of a buffer queues its work
on the buffer's own stream, so a later call's packing runs only after an earlier call's
host copy has read the buffer. The buffers stay allocated (at most
``STAGING_STREAMS_MAX * STAGING_BYTES_MAX``); ``release_staging`` frees them.
"""

from __future__ import annotations

import threading

import torch

# One chunk of a 32-layer bf16 model with 8 KV heads of 128 and 256 tokens is 32 MiB;
# larger requests get a one-off buffer from torch's (stream-ordered) caching allocator.
STAGING_BYTES_MAX = 256 << 20
STAGING_STREAMS_MAX = 8
# Rounding up lets chunks of slightly different sizes share one buffer without regrowth.
_STAGING_ALIGN_BYTES = 2 << 20

_buffers: dict[tuple[int, int], torch.Tensor] = {}
_lock = threading.Lock()


def staging_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    """A 1-D uint8 tensor of ``nbytes`` on ``device``, valid for work queued on the
    current stream. Its contents are undefined."""
    if nbytes > STAGING_BYTES_MAX:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    with _lock:
        buf = _buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            # The old buffer goes back to the caching allocator, tagged with this stream:
            # it is reused only by work ordered after what is queued on it now.
            _buffers.pop(key, None)
            while len(_buffers) >= STAGING_STREAMS_MAX:
                _buffers.pop(next(iter(_buffers)))
            size = min(-(-nbytes // _STAGING_ALIGN_BYTES) * _STAGING_ALIGN_BYTES, STAGING_BYTES_MAX)
            buf = torch.empty(size, dtype=torch.uint8, device=device)  # on ``stream``
            _buffers[key] = buf
    return buf[:nbytes]


def release_staging() -> None:
    """Drop every cached staging buffer (they return to torch's caching allocator)."""
    with _lock:
        _buffers.clear()
