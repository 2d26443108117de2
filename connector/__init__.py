"""The kvnode connector for vLLM.

``KVNodeConnector`` is imported lazily: ``kvnode.connector.config`` and the scheduler
logic stay importable (and unit-testable) without loading vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVNodeConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVNodeConnector":
        from kvnode.connector.connector import KVNodeConnector

        return KVNodeConnector
    raise AttributeError(f"module 'kvnode.connector' has no attribute {name!r}")
