"""Cache tiers below the arena: local disk (survives restarts) and S3 (shared across
nodes), and the manager that moves chunks between them and the arena.

- ``format``: the header every stored chunk carries, checksums.
- ``base``: the store interface, slot views, per-tier stats.
- ``disk``, ``s3``, ``memory``: the stores (``memory`` is the unit-test fake).
- ``pool``: I/O threads; ``manager``: ``TierManager``, the agent's only entry point.
"""

from kvnode.agent.tiers.manager import TierManager, build_stores

__all__ = ["TierManager", "build_stores"]
