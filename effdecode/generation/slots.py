"""How many KV slots a call gets: ``DecodeConfig.max_slots`` resolved (continuous batching).

A *slot* is one row's place in the slot KV cache (and in the draft model's cache). With ``max_slots=S``
smaller than the batch, only ``S`` rows decode at once; waiting rows take the slots of rows that finish.
``"auto"`` picks the largest ``S`` whose caches fit in free memory: a row costs its cache entries
(``kv_budget + compress_every`` with eviction, else prompt + ``max_new_tokens`` + lookahead) times the bytes
of one entry over all layers, keys and values, plus the eviction side buffers and the draft model's cache.
"""

from __future__ import annotations

import torch

from effdecode.cache import KVGeometry, free_memory_bytes
from effdecode.compression.kv_compressor import KVCompressor
from effdecode.config import DecodeConfig

# Share of the free memory "auto" may fill: the CPU's MemAvailable also serves the rest of the process.
CPU_FRACTION = 0.5
CUDA_FRACTION = 0.9
_SCORED = frozenset({"h2o", "snapkv", "rkv"})


def row_capacity(config: DecodeConfig, max_prompt: int, max_new_tokens: int, lookahead: int) -> int:
    """Cache entries one row needs: its whole sequence, or with ``kv_budget`` the compressor's limit."""
    needed = max_prompt + max_new_tokens + lookahead
    if config.compresses:
        return KVCompressor.capacity_for(config, max_prompt, needed)
    return needed


def row_bytes(
    model: torch.nn.Module,
    config: DecodeConfig,
    capacity: int,
    draft_model: torch.nn.Module | None = None,
) -> int:
    """Bytes one slot costs: the target's K/V entries (all layers, keys and values) for ``capacity`` entries,
    the eviction side buffers, and the draft model's cache (as many entries)."""
    total = 0
    for owner in (model, draft_model):
        if owner is None:
            continue
        geometry = KVGeometry.from_model(owner)
        total += capacity * geometry.bytes_per_token(owner.dtype)
        if config.compresses:  # entry positions (int32), and float32 scores for the scored policies
            per_entry = 4 + (4 if config.kv_policy in _SCORED and owner is model else 0)
            total += geometry.num_layers * geometry.kv_heads * capacity * per_entry
    return total


def free_bytes_for_slots(device: torch.device) -> int:
    """The memory "auto" may fill on ``device``: a share of what is free (CUDA) or available (CPU)."""
    device = torch.device(device)
    fraction = CUDA_FRACTION if device.type == "cuda" else CPU_FRACTION
    return int(free_memory_bytes(device) * fraction)


def auto_slots(
    model: torch.nn.Module,
    config: DecodeConfig,
    batch_size: int,
    max_prompt: int,
    max_new_tokens: int,
    lookahead: int = 0,
    draft_model: torch.nn.Module | None = None,
    free_bytes: int | None = None,
) -> int:
    """The slot count ``"auto"`` picks: as many rows as fit in ``free_bytes``, within ``[1, batch_size]``.

    Parameters
    ----------
    model : torch.nn.Module
        The target model (its KV geometry and dtype).
    config : DecodeConfig
        ``kv_budget`` / ``compress_every`` / ``kv_policy`` decide a row's entries.
    batch_size : int
        Rows of the call (the most slots worth having).
    max_prompt, max_new_tokens, lookahead : int
        Longest prompt, new tokens, and the columns a step may write past a row's end.
    draft_model : torch.nn.Module, optional
        The assistant model, whose cache has as many slots.
    free_bytes : int, optional
        Memory to fill; by default :func:`free_bytes_for_slots` on the model's device.

    Raises
    ------
    ValueError
        When not even one row fits.
    """
    capacity = row_capacity(config, max_prompt, max_new_tokens, lookahead)
    per_row = row_bytes(model, config, capacity, draft_model)
    if free_bytes is None:
        free_bytes = free_bytes_for_slots(model.device)
    if per_row > free_bytes:
        raise ValueError(
            f"DecodeConfig(max_slots='auto'): one row needs {per_row:,} bytes of KV cache "
            f"({capacity} entries) but only {free_bytes:,} bytes are free for it on {model.device}; "
            "lower max_new_tokens, set kv_budget, or shorten the prompts"
        )
    return max(1, min(batch_size, free_bytes // per_row))


def resolve_slots(
    model: torch.nn.Module,
    config: DecodeConfig,
    batch_size: int,
    max_prompt: int,
    max_new_tokens: int,
    lookahead: int = 0,
    draft_model: torch.nn.Module | None = None,
) -> int:
    """``config.max_slots`` as a slot count in ``[1, batch_size]`` (None: ``batch_size``)."""
    if config.max_slots is None:
        return batch_size
    if config.max_slots == "auto":
        return auto_slots(model, config, batch_size, max_prompt, max_new_tokens, lookahead, draft_model)
    return min(int(config.max_slots), batch_size)
