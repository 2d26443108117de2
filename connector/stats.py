"""Connector statistics in vLLM's ``KVConnectorStats`` form.

Workers and the scheduler side each report counters for the last interval; vLLM
aggregates them (sums here) and logs ``reduce()`` as "KV Transfer metrics".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class KVNodeStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVNodeStats:
        merged = dict(self.data)
        for k, v in (other.data or {}).items():
            if isinstance(v, (int, float)):
                merged[k] = merged.get(k, 0) + v
        return KVNodeStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        d: dict[str, Any] = {k: v for k, v in self.data.items() if isinstance(v, (int, float))}
        out: dict[str, int | float] = {
            k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()
        }
        if d.get("load_s"):
            out["load_GBps"] = round(d.get("load_bytes", 0) / d["load_s"] / 1e9, 3)
        if d.get("save_s"):
            out["save_GBps"] = round(d.get("save_bytes", 0) / d["save_s"] / 1e9, 3)
        if d.get("query_tokens"):
            out["hit_rate"] = round(d.get("hit_tokens", 0) / d["query_tokens"], 4)
        return out

    def is_empty(self) -> bool:
        return not any(v for v in self.data.values() if isinstance(v, (int, float)))
