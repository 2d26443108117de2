"""A worker's GPU KV cache as agent mode exports it, and its side of the events.

The export is a list of encoded handles: one ``IpcHandle`` per layer (in the export's
layer order), then the ``ready`` event, then one event per layer. The worker records
``ready`` on its stream before it hands a job over, so the agent's copy stream starts
only after the forward pass (saves) or vLLM's zeroing of new blocks (loads). The agent
records layer ``i``'s event after queueing that layer of a load; once the worker has
read the layer's progress mark it makes its stream wait on the event (``wait_layer``),
so the GPU, not the host, orders attention after the copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvnode.kernels import ipchandle as H
from kvnode.kernels.ipchandle import split_wire_handles

__all__ = ["GpuExport", "open_events", "split_wire_handles"]


class GpuExport:
    """Handles and events of one worker's cache (every layer on one GPU)."""

    def __init__(self, kvs: Sequence[torch.Tensor]) -> None:
        if not kvs:
            raise H.ExportRefused("no layers to export")
        device = kvs[0].device
        if device.type != "cuda" or any(kv.device != device for kv in kvs):
            raise H.ExportRefused(f"layers on {sorted({str(kv.device) for kv in kvs})}")
        self.device = device
        self.layers = H.export_cache(kvs)
        uuid = H.normalize_uuid(torch.cuda.get_device_properties(device).uuid)
        self.name = f"cuda:{uuid}"  # the export's device: one agent copy thread per GPU
        with torch.cuda.device(device):
            self.ready = torch.cuda.Event(interprocess=True)
            self.layer_events = [torch.cuda.Event(interprocess=True) for _ in kvs]
            for e in (self.ready, *self.layer_events):
                e.record()  # an event must exist on the device before it is shared

    def wire_handles(self) -> list[bytes]:
        ordinal = self.device.index if self.device.index is not None else 0
        events = [self.ready, *self.layer_events]
        return self.layers + [H.encode(H.export_event(e, ordinal)) for e in events]

    def record_ready(self) -> None:
        """Before handing a job over: the agent's copies start after this point."""
        self.ready.record(torch.cuda.current_stream(self.device))

    def wait_layer(self, i: int) -> None:
        """After layer ``i``'s progress mark: this stream's next work (attention on the
        layer) runs after the agent's copy of it."""
        torch.cuda.current_stream(self.device).wait_event(self.layer_events[i])


def open_events(
    ready: bytes, events: Sequence[bytes], uuids: Mapping[str, int]
) -> tuple[torch.cuda.Event, list[torch.cuda.Event]]:
    """The worker's events, opened in the agent."""
    return (
        H.open_event(H.decode_event(ready), uuids),
        [H.open_event(H.decode_event(e), uuids) for e in events],
    )
