"""Shared prefill for ``num_return_sequences = k``: the rows of one prompt admitted together are prefilled
once and the prompt's KV is copied into their slots (one gather + copy over every layer at once: the cache
keeps all layers in one buffer).

Rows ``p * k .. p * k + k - 1`` hold prompt ``p`` (transformers' ``repeat_interleave`` order). The first-token
choice stays per row, from the prompt's logits repeated. Under KV eviction the prefill records attention
scores per row, so there each row is prefilled (``DecodeCall.share = 1``).
"""

from __future__ import annotations

import numpy as np
import torch

from effdecode.cache import SlotKVCache


def sharing_groups(requests: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """How admitted rows share prefills.

    Parameters
    ----------
    requests : np.ndarray
        int64 ``[A]``, the admitted request rows (increasing).
    k : int
        Rows per prompt.

    Returns
    -------
    tuple of np.ndarray or None
        ``(first [G], group [A])``: the position of each prompt's first admitted row and each row's group;
        None when no two admitted rows share a prompt.
    """
    if k <= 1:
        return None
    _, first, group = np.unique(np.asarray(requests) // k, return_index=True, return_inverse=True)
    if len(first) == len(requests):
        return None
    return first, group.reshape(-1)


def replicate_slots(cache: SlotKVCache, sources: torch.Tensor, targets: torch.Tensor, width: int) -> None:
    """Copy the first ``width`` entries, length and positions of slots ``sources[i]`` into ``targets[i]``.

    The gather makes a copy first, so a slot that is both a source and a target is safe.
    """
    for buffer in (cache.key_buffer, cache.value_buffer):  # [layers, slots, kv_heads, capacity, head_dim]
        buffer[:, targets, :, :width] = buffer[:, sources, :, :width]
    cache.cache_lens[targets] = cache.cache_lens[sources]
    cache.positions[targets] = cache.positions[sources]


def replicate_prefill(
    cache: SlotKVCache,
    logits: torch.Tensor,
    first_slots: torch.Tensor,
    slots: torch.Tensor,
    group: np.ndarray,
    width: int,
) -> torch.Tensor:
    """After a prefill of each prompt's first row (into ``first_slots`` ``[G]``), fill every admitted
    slot (``slots`` ``[A]``, row ``i`` of group ``group[i]``) from it; returns all rows' logits ``[A, V]``."""
    index = torch.as_tensor(group, device=slots.device)
    replicate_slots(cache, first_slots[index], slots, width)
    return logits.index_select(0, index)
