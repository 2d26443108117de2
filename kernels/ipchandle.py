"""CUDA/HIP IPC handles for a worker's KV cache: export in the worker, open in the agent.

A layer tensor lives in a block of torch's caching allocator. ``export_tensor`` takes
torch's own IPC reduction of its storage (``cudaIpcGetMemHandle`` on the allocation's
base plus the storage's offset, or the shareable handle of an expandable segment) and
adds what the agent needs to rebuild the view: the layer's offset in the storage, its
shape, strides and dtype, and the device's UUID, so the agent opens it on its own
ordinal (``CUDA_VISIBLE_DEVICES`` may number the GPUs differently in each process).

Memory torch's caching allocator did not make, or made in a private pool (vLLM's
sleep-mode allocator maps memory with the CUDA VMM API, which IPC handles cannot
share), is refused with ``ExportRefused``: the connector then copies itself (worker
mode). Interprocess events travel the same way (``export_event``/``open_event``).

Everything read from a handle is bounded before use, and the rebuilt view must lie
inside the storage it opened: a forged handle is refused, never mapped out of bounds.
Decoding and checking a handle needs no torch (the agent does it on its loop); torch is
imported where a tensor is exported or opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

if TYPE_CHECKING:
    import torch

HANDLE_VERSION = 1
# A CUDA IPC memory handle is 64 bytes; an expandable segment's handle carries one
# entry per mapped page of the segment, so allow some kilobytes.
HANDLE_BYTES_MAX = 64 << 10
EVENT_HANDLE_BYTES = 64
UUID_CHARS_MAX = 64
DIMS_MAX = 8
_U63 = (1 << 63) - 1

# Element sizes of the dtypes a KV cache may have (torch's names, without "torch.").
ITEMSIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

Size = Annotated[int, Meta(ge=0, le=_U63)]
Dims = Annotated[list[Size], Meta(max_length=DIMS_MAX)]


class ExportRefused(Exception):
    """This memory cannot be shared with the agent; the line says why (worker mode)."""


class HandleError(ValueError):
    """A handle that does not decode, names a GPU the agent does not see, or describes
    a view outside what it opens."""


class IpcHandle(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One exported tensor: torch's IPC reduction of its storage plus the view."""

    version: int
    device_uuid: Annotated[str, Meta(max_length=UUID_CHARS_MAX)]
    handle: Annotated[bytes, Meta(min_length=1, max_length=HANDLE_BYTES_MAX)]
    storage_bytes: Size
    storage_offset: Size  # bytes of the storage from its allocation's base
    ref_counter: Annotated[bytes, Meta(max_length=HANDLE_BYTES_MAX)]
    ref_counter_offset: Size
    event: Annotated[bytes, Meta(max_length=EVENT_HANDLE_BYTES)]
    event_sync: bool
    offset: Size  # elements of the tensor from the storage's start
    shape: Dims
    strides: Dims
    dtype: Annotated[str, Meta(max_length=32)]


class EventHandle(msgspec.Struct, array_like=True, frozen=True, gc=False):
    version: int
    device_uuid: Annotated[str, Meta(max_length=UUID_CHARS_MAX)]
    handle: Annotated[bytes, Meta(min_length=EVENT_HANDLE_BYTES, max_length=EVENT_HANDLE_BYTES)]


_encoder = msgspec.msgpack.Encoder()
_handle_decoder = msgspec.msgpack.Decoder(IpcHandle)
_event_decoder = msgspec.msgpack.Decoder(EventHandle)


def encode(h: IpcHandle | EventHandle) -> bytes:
    return _encoder.encode(h)


def decode(data: bytes) -> IpcHandle:
    if len(data) > HANDLE_BYTES_MAX + 1024:
        raise HandleError(f"handle of {len(data)} bytes")
    try:
        h = _handle_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise HandleError(f"malformed tensor handle: {exc}") from exc
    if h.version != HANDLE_VERSION:
        raise HandleError(f"tensor handle version {h.version}, this agent reads {HANDLE_VERSION}")
    if h.dtype not in ITEMSIZES or len(h.shape) != len(h.strides) or not h.shape:
        raise HandleError(f"tensor handle with dtype {h.dtype!r}, shape {h.shape}")
    return h


def decode_event(data: bytes) -> EventHandle:
    try:
        e = _event_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise HandleError(f"malformed event handle: {exc}") from exc
    if e.version != HANDLE_VERSION:
        raise HandleError(f"event handle version {e.version}")
    return e


def normalize_uuid(uuid: object) -> str:
    """``GPU-7f2b...``, ``7f2b...`` and torch's ``_CUuuid`` all as ``7f2b...``."""
    return str(uuid).strip().lower().removeprefix("gpu-")


def device_uuids() -> dict[str, int]:
    """UUID -> ordinal of every GPU this process sees."""
    import torch

    if not torch.cuda.is_available():
        return {}
    count = torch.cuda.device_count()
    return {normalize_uuid(torch.cuda.get_device_properties(i).uuid): i for i in range(count)}


def ordinal_of(uuid: str, uuids: Mapping[str, int]) -> int:
    """This process's ordinal of the GPU ``uuid``; ``HandleError`` when it does not
    see that GPU (its ``CUDA_VISIBLE_DEVICES`` leaves it out, or no GPU access)."""
    ordinal = uuids.get(normalize_uuid(uuid))
    if ordinal is None:
        seen = ", ".join(sorted(uuids)) or "none"
        raise HandleError(f"GPU {uuid} is not visible to the agent (it sees: {seen})")
    return ordinal


def allocator_check(
    address: int, nbytes: int, device: int, segments: Iterable[Mapping[str, Any]]
) -> None:
    """Refuse memory that does not lie in one segment of torch's caching allocator's
    default pool on ``device`` (``segments``: ``torch.cuda.memory_snapshot()``)."""
    for seg in segments:
        start, size = int(seg.get("address", 0)), int(seg.get("total_size", 0))
        if seg.get("device", device) != device or not start <= address < start + size:
            continue
        if address + nbytes > start + size:
            raise ExportRefused(
                f"the KV cache at {address:#x} spans more than one allocator segment"
            )
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if any(pool):
            raise ExportRefused(
                f"the KV cache is in a private memory pool {pool} (vLLM's sleep mode "
                "allocates it with the CUDA VMM API, which IPC handles cannot share)"
            )
        return
    raise ExportRefused(
        f"the KV cache at {address:#x} was not allocated by torch's caching allocator "
        "(e.g. vLLM's sleep mode); agent mode cannot share it"
    )


def export_tensor(
    t: torch.Tensor, segments: Sequence[Mapping[str, Any]] | None = None
) -> IpcHandle:
    """The handle of ``t`` (a CUDA tensor of torch's caching allocator). ``segments``
    defaults to a fresh ``torch.cuda.memory_snapshot()`` (pass one for many tensors)."""
    import torch

    if t.device.type != "cuda":
        raise ExportRefused(f"a {t.device.type} tensor has no GPU IPC handle")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in ITEMSIZES:
        raise ExportRefused(f"dtype {t.dtype} is not exported")
    storage = t.untyped_storage()
    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    snapshot = torch.cuda.memory_snapshot() if segments is None else segments
    allocator_check(storage.data_ptr(), storage.nbytes(), device, snapshot)
    try:
        shared = storage._share_cuda_()
    except RuntimeError as exc:
        raise ExportRefused(f"torch refused an IPC handle for the KV cache: {exc}") from exc
    _, handle, size, offset, ref_counter, ref_offset, event, event_sync = shared
    return IpcHandle(
        version=HANDLE_VERSION,
        device_uuid=normalize_uuid(torch.cuda.get_device_properties(device).uuid),
        handle=bytes(handle),
        storage_bytes=int(size),
        storage_offset=int(offset),
        ref_counter=bytes(ref_counter or b""),
        ref_counter_offset=int(ref_offset or 0),
        event=bytes(event or b""),
        event_sync=bool(event_sync),
        offset=int(t.storage_offset()),
        shape=[int(n) for n in t.shape],
        strides=list(t.stride()),
        dtype=dtype,
    )


def export_cache(kvs: Sequence[torch.Tensor]) -> list[bytes]:
    """Encoded handles of every layer of a worker's cache (one allocator snapshot for
    all of them); ``ExportRefused`` if any layer cannot be shared."""
    import torch

    snapshot = torch.cuda.memory_snapshot() if kvs and kvs[0].is_cuda else []
    return [encode(export_tensor(kv, snapshot)) for kv in kvs]


def open_cache(handles: Sequence[bytes], uuids: Mapping[str, int]) -> list[torch.Tensor]:
    """The layers of an exported cache, opened; ``HandleError`` names the first that
    could not be."""
    return [open_tensor(decode(h), uuids) for h in handles]


def view_fits(h: IpcHandle) -> bool:
    """The view ``h`` describes lies inside the storage it names."""
    itemsize = ITEMSIZES[h.dtype]
    if any(s <= 0 for s in h.shape):
        return False
    last = h.offset + sum((n - 1) * s for n, s in zip(h.shape, h.strides, strict=True))
    return (last + 1) * itemsize <= h.storage_bytes


def open_tensor(h: IpcHandle, uuids: Mapping[str, int]) -> torch.Tensor:
    """The worker's tensor, mapped into this process on the ordinal of its GPU."""
    if not view_fits(h):
        raise HandleError(f"view {h.shape}/{h.strides}+{h.offset} outside {h.storage_bytes} bytes")
    import torch

    ordinal = ordinal_of(h.device_uuid, uuids)
    torch.cuda._lazy_init()
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            ordinal,
            h.handle,
            h.storage_bytes,
            h.storage_offset,
            h.ref_counter or None,
            h.ref_counter_offset,
            h.event or None,
            h.event_sync,
        )
    except RuntimeError as exc:
        raise HandleError(f"cannot open the worker's IPC handle: {exc}") from exc
    t = torch.empty(0, dtype=getattr(torch, h.dtype), device=torch.device("cuda", ordinal))
    return t.set_(storage, h.offset, tuple(h.shape), tuple(h.strides))


def export_event(event: torch.cuda.Event, device: int) -> EventHandle:
    """The handle of an interprocess event (``torch.cuda.Event(interprocess=True)``,
    recorded at least once)."""
    import torch

    uuid = normalize_uuid(torch.cuda.get_device_properties(device).uuid)
    return EventHandle(HANDLE_VERSION, uuid, bytes(event.ipc_handle()))


def open_event(e: EventHandle, uuids: Mapping[str, int]) -> torch.cuda.Event:
    import torch

    ordinal = ordinal_of(e.device_uuid, uuids)
    try:
        return torch.cuda.Event.from_ipc_handle(ordinal, e.handle)
    except RuntimeError as exc:
        raise HandleError(f"cannot open the worker's event: {exc}") from exc


def split_wire_handles(
    handles: Sequence[bytes], layers: int
) -> tuple[list[bytes], bytes, list[bytes]]:
    """An export's handles as ``GpuExport.wire_handles`` lays them out: (layer handles,
    ready event, layer events); ``HandleError`` unless there are ``2 * layers + 1``."""
    if len(handles) != 2 * layers + 1:
        raise HandleError(f"{len(handles)} handles for {layers} layers (want {2 * layers + 1})")
    return list(handles[:layers]), handles[layers], list(handles[layers + 1 :])


def check_wire_handles(handles: Sequence[bytes], layers: int) -> list[IpcHandle]:
    """Decode and bound-check every handle of an export (no torch, no GPU): what the
    agent can refuse at once, before anything is opened."""
    tensors, ready, events = split_wire_handles(handles, layers)
    decoded = [decode(h) for h in tensors]
    for h in decoded:
        if not view_fits(h):
            raise HandleError(
                f"view {h.shape}/{h.strides}+{h.offset} outside {h.storage_bytes} bytes"
            )
    for e in (ready, *events):
        decode_event(e)
    return decoded
