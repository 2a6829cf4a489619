"""Pieces both decode loops use: one forward over the slot cache, the batched prefill, stop criteria."""

from __future__ import annotations

import torch

from effdecode.cache import SlotKVCache
from effdecode.hf_attention import STEP_KWARG, StepContext
from effdecode.ops.attention import SlotBatch


def forward_logits(
    model: torch.nn.Module,
    cache: SlotKVCache,
    batch: SlotBatch,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    last_only: bool = True,
    scores: list[torch.Tensor] | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` ``[B, T]`` (or ``inputs_embeds`` ``[B, T, H]``) over the slot cache.

    Returns the last column's logits ``[B, V]`` when ``last_only``, else every column's ``[B, T, V]``.
    ``scores`` (one float32 ``[slots, kv_heads, capacity]`` buffer per layer) receives the attention mass of
    this forward's queries.
    """
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    outputs = model(
        **inputs,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=1 if last_only else 0,
        **{STEP_KWARG: StepContext(cache, batch, scores)},
    )
    return outputs.logits[:, -1] if last_only else outputs.logits


def prefill(
    model: torch.nn.Module,
    cache: SlotKVCache,
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    backend: str,
    scores: list[torch.Tensor] | None = None,
    inputs_embeds: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    lens_host=None,
) -> torch.Tensor:
    """Write every prompt into its slot in one forward; set the slots' lengths/positions to the prompts'.

    Parameters
    ----------
    input_ids : torch.Tensor
        int64 ``[A, T0]``, left-padded, so the real tokens are right-aligned as the attention layout wants.
    prompt_lens : torch.Tensor
        int32 ``[A]`` real tokens per row.
    slots : torch.Tensor, optional
        int64 ``[A]`` the slots to fill (their old entries are dropped); None: slots ``0 .. A-1``.
    lens_host : np.ndarray, optional
        ``prompt_lens`` on the host (saves reading them back).

    Returns
    -------
    torch.Tensor
        ``[A, V]`` logits after each row's last prompt token (``logits_to_keep=1`` is exact because the
        last column is every row's last prompt token).
    """
    batch_size, prompt_width = input_ids.shape
    device = input_ids.device
    if lens_host is None:
        max_prompt, min_prompt = int(prompt_lens.max()), int(prompt_lens.min())
    else:
        max_prompt, min_prompt = int(lens_host.max()), int(lens_host.min())
    if max_prompt < prompt_width:  # columns that are padding in every row: left out of the forward
        input_ids = input_ids[:, prompt_width - max_prompt :]
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds[:, prompt_width - max_prompt :]
        prompt_width = max_prompt
    leading = slots is None
    if slots is None:
        slots = torch.arange(batch_size, device=device)
    cache.cache_lens[slots] = 0
    cache.positions[slots] = 0
    columns = torch.arange(prompt_width, device=device)
    padding = prompt_width - prompt_lens.long()
    position_ids = (columns[None, :] - padding[:, None]).clamp_(min=0)
    batch = SlotBatch(
        slots.to(torch.int32),
        cache.cache_lens,
        prompt_lens,
        kv_len_bound=max_prompt,
        backend=backend,
        rows_are_leading_slots=leading,
        q_full=max_prompt == min_prompt,
    )
    prefill_ids = input_ids.masked_fill(columns[None, :] < padding[:, None], 0)
    # ``inputs_embeds`` ``[B, T0, H]`` (generate's argument) replaces the ids' embeddings in the prefill only.
    logits = forward_logits(
        model, cache, batch, prefill_ids, position_ids, scores=scores, inputs_embeds=inputs_embeds
    )
    cache.cache_lens[slots] = prompt_lens.to(torch.int32)
    cache.positions[slots] = prompt_lens.long()
    return logits


def criteria_hit(criteria: list, history: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """OR of the user's / stop-string criteria over rows of ``history`` ``[B, L]``: bool ``[B]``."""
    hit = torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
    for criterion in criteria:
        result = criterion(history, scores)
        if not isinstance(result, torch.Tensor):
            result = torch.full((history.shape[0],), bool(result), device=history.device)
        hit |= result.to(device=history.device, dtype=torch.bool)
    return hit


def right_aligned_windows(
    sequences: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, width: int, pad: int
) -> torch.Tensor:
    """``[B, width]`` windows of ``sequences`` rows ending at column ``ends[b]`` (left-filled with pad)."""
    index = ends[:, None] - (width - 1) + torch.arange(width, device=ends.device)[None, :]
    windows = sequences[rows[:, None], index.clamp(min=0)]
    return windows.masked_fill(index < 0, pad)
