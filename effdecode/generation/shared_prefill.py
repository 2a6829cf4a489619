"""Shared prefill for ``num_return_sequences = k``: each prompt is prefilled once and its KV copied into its
k slots (one gather + copy over every layer at once: the cache keeps all layers in one buffer).

Rows ``p * k .. p * k + k - 1`` hold prompt ``p`` (transformers' ``repeat_interleave`` order); the first-token
choice stays per row, from the prompt's logits repeated k times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from effdecode.cache import SlotKVCache


def replicate_slots(cache: SlotKVCache, groups: int, k: int, width: int) -> None:
    """Slot ``p < groups``'s first ``width`` entries, length and position into slots ``p*k .. p*k + k - 1``.

    Slots are read before they are written (the gather makes a copy), so overlapping sources are safe.
    """
    rows = groups * k
    source = torch.arange(rows, device=cache.cache_lens.device) // k
    for buffer in (cache.key_buffer, cache.value_buffer):  # [layers, slots, kv_heads, capacity, head_dim]
        buffer[:, :rows, :, :width] = buffer[:, source, :, :width]
    cache.cache_lens[:rows] = cache.cache_lens[source]
    cache.positions[:rows] = cache.positions[source]


def prefill_once(
    prefill: Callable[..., torch.Tensor | None],
    cache: SlotKVCache,
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    k: int,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run ``prefill(ids, lens, embeds)`` on every k-th row (slots ``0 .. B/k - 1``), then replicate.

    Parameters
    ----------
    prefill : callable
        Fills slots ``0 .. n-1`` with prompts ``[n, T0]``; returns their logits ``[n, V]`` (or None).
    input_ids : torch.Tensor
        int64 ``[B, T0]`` with ``B = P * k``, each prompt's k rows consecutive and equal.
    prompt_lens : torch.Tensor
        int32 ``[B]``.

    Returns
    -------
    torch.Tensor or None
        ``[B, V]``: each prompt's logits repeated for its k rows.
    """
    if k == 1:
        return prefill(input_ids, prompt_lens, inputs_embeds)
    embeds = inputs_embeds[::k] if inputs_embeds is not None else None
    logits = prefill(input_ids[::k], prompt_lens[::k], embeds)
    replicate_slots(cache, input_ids.shape[0] // k, k, input_ids.shape[1])
    return logits.repeat_interleave(k, dim=0) if logits is not None else None


def sharing_factor(request, compresses: bool) -> int:
    """Rows per shared prefill: ``num_return_sequences`` unless KV eviction is on (its prefill records
    attention scores per row) or there is a single return sequence."""
    k = getattr(request, "num_return_sequences", 1) or 1
    return k if k > 1 and not compresses else 1


def prefill_draft(drafting, input_ids: torch.Tensor, prompt_lens: torch.Tensor, k: int) -> None:
    """The drafter's prefill, shared like the target's where it keeps a slot cache without eviction."""
    drafter = drafting.drafter
    cache = getattr(drafter, "cache", None)
    if k == 1 or cache is None or getattr(drafter, "compressor", None) is not None:
        drafting.prefill(input_ids, prompt_lens)
        return
    prefill_once(lambda ids, lens, _: drafter.prefill(ids, lens), cache, input_ids, prompt_lens, k)
