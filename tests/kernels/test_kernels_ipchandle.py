"""IPC handles of exported caches: encoding, bounds, GPU mapping by UUID and the
refusals, all of which run without a GPU."""

from __future__ import annotations

import msgspec
import pytest
import torch

from kvnode.kernels import ipchandle as H


def handle(**changes: object) -> H.IpcHandle:
    fields = dict(
        version=H.HANDLE_VERSION,
        device_uuid="7f2b0c1e-aaaa-bbbb-cccc-0123456789ab",
        handle=b"\x01" * 64,
        storage_bytes=2 * 24 * 16 * 2 * 8 * 2,
        storage_offset=4096,
        ref_counter=b"/torch_123_456",
        ref_counter_offset=0,
        event=b"",
        event_sync=False,
        offset=0,
        shape=[2, 24, 16, 2, 8],
        strides=[24 * 16 * 2 * 8, 16 * 2 * 8, 2 * 8, 8, 1],
        dtype="bfloat16",
    )
    fields.update(changes)
    return H.IpcHandle(**fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    h = handle()
    assert H.decode(H.encode(h)) == h
    assert H.view_fits(h)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\x00garbage", "malformed"),
        (H.encode(handle(version=2)), "version"),
        (H.encode(handle(dtype="complex128")), "dtype"),
        (H.encode(handle(strides=[1])), "shape"),
        (b"\x00" * (H.HANDLE_BYTES_MAX + 2048), "bytes"),
    ],
)
def test_bad_handles_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(H.HandleError, match=match):
        H.decode(data)


def test_oversized_fields_do_not_decode() -> None:
    raw = msgspec.msgpack.encode(
        [1, "u" * (H.UUID_CHARS_MAX + 1), b"h", 0, 0, b"", 0, b"", False, 0, [1], [1], "uint8"]
    )
    with pytest.raises(H.HandleError, match="malformed"):
        H.decode(raw)
    negative = msgspec.msgpack.encode(
        [1, "u", b"h", 64, 0, b"", 0, b"", False, 0, [4], [-1], "uint8"]
    )
    with pytest.raises(H.HandleError, match="malformed"):
        H.decode(negative)


def test_views_outside_their_storage_are_refused() -> None:
    assert not H.view_fits(handle(offset=1))  # one element past the end
    assert not H.view_fits(handle(shape=[2, 25, 16, 2, 8]))
    assert not H.view_fits(handle(shape=[0, 24, 16, 2, 8]))
    assert H.view_fits(handle(storage_bytes=handle().storage_bytes + 2, offset=1))
    with pytest.raises(H.HandleError, match="outside"):
        H.open_tensor(handle(offset=1), {})


def test_gpu_found_by_uuid_not_by_ordinal() -> None:
    uuids = {"aaaa": 0, "7f2b0c1e-aaaa-bbbb-cccc-0123456789ab": 1}
    assert H.ordinal_of("GPU-7F2B0C1E-aaaa-bbbb-cccc-0123456789ab", uuids) == 1
    with pytest.raises(H.HandleError, match="not visible"):
        H.ordinal_of("bbbb", uuids)
    with pytest.raises(H.HandleError, match="sees: none"):
        H.open_tensor(handle(), {})


SEGMENTS = [
    {"device": 0, "address": 0x10000, "total_size": 0x10000, "segment_pool_id": (0, 0)},
    {"device": 0, "address": 0x40000, "total_size": 0x10000, "segment_pool_id": (1, 3)},
    {"device": 1, "address": 0x80000, "total_size": 0x10000, "segment_pool_id": (0, 0)},
]


def test_allocator_check() -> None:
    H.allocator_check(0x10000, 0x10000, 0, SEGMENTS)  # the whole default-pool segment
    H.allocator_check(0x18000, 0x100, 0, SEGMENTS)
    with pytest.raises(H.ExportRefused, match="private memory pool"):
        H.allocator_check(0x40000, 0x100, 0, SEGMENTS)
    with pytest.raises(H.ExportRefused, match="not allocated by torch"):
        H.allocator_check(0x30000, 0x100, 0, SEGMENTS)
    with pytest.raises(H.ExportRefused, match="not allocated by torch"):
        H.allocator_check(0x80000, 0x100, 0, SEGMENTS)  # another device's segment
    with pytest.raises(H.ExportRefused, match="more than one"):
        H.allocator_check(0x18000, 0x10000, 0, SEGMENTS)
    with pytest.raises(H.ExportRefused, match="not allocated by torch"):
        H.allocator_check(0x10000, 0x100, 0, [])


def test_cpu_tensors_have_no_handle() -> None:
    with pytest.raises(H.ExportRefused, match="cpu"):
        H.export_tensor(torch.zeros(4))
    with pytest.raises(H.ExportRefused, match="cpu"):
        H.export_cache([torch.zeros(4)])
    with pytest.raises(H.HandleError, match="malformed"):
        H.open_cache([b"junk", H.encode(handle())], {handle().device_uuid: 0})
    assert H.normalize_uuid("GPU-AbC") == "abc"
    if not torch.cuda.is_available():
        assert H.device_uuids() == {}


def test_wire_handles_split_by_layer_count() -> None:
    from kvnode.kernels.gpuexport import GpuExport, split_wire_handles

    layers, ready, events = split_wire_handles([b"a", b"b", b"r", b"e1", b"e2"], 2)
    assert (layers, ready, events) == ([b"a", b"b"], b"r", [b"e1", b"e2"])
    with pytest.raises(H.HandleError, match="want 5"):
        split_wire_handles([b"a", b"b", b"r", b"e1"], 2)
    with pytest.raises(H.ExportRefused, match="no layers"):
        GpuExport([])
    with pytest.raises(H.ExportRefused, match="cpu"):
        GpuExport([torch.zeros(2)])
    bad_event = H.encode(H.EventHandle(H.HANDLE_VERSION, "u", b"\0" * 63 + b"x"))
    with pytest.raises(H.HandleError, match="version"):
        H.decode_event(H.encode(H.EventHandle(9, "u", b"\0" * 64)))
    with pytest.raises(H.HandleError, match="not visible"):
        H.open_event(H.decode_event(bad_event), {})
    with pytest.raises(H.HandleError, match="malformed"):
        H.decode_event(b"\x93\x01")
