"""Thought compression: KV eviction policies (which entries a compacted row keeps)."""

from effdecode.compression.policies import (
    POLICIES,
    RKV_LAMBDA,
    SNAPKV_POOL,
    protection_masks,
    select_keep,
)

__all__ = ["POLICIES", "RKV_LAMBDA", "SNAPKV_POOL", "protection_masks", "select_keep"]
