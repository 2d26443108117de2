"""The kvnode agent: one daemon per node owning the cache tiers."""
