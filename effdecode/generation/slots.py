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


def row_layout(request) -> tuple[int, int, int]:
    """``(lookahead, capacity, probe_room)`` of a :class:`~effdecode.generation.request.GenerationRequest`.

    ``lookahead``: columns a step may write past a row's end (drafts, forced thinking text or a DEER probe,
    and one more); ``capacity``: cache entries per slot (with ``kv_budget`` the compressor's limit, plus a
    probe's room); ``probe_room``: what a probe holds past a row's entries until it is decided.
    """
    config = request.decode_config
    plan, speculation = request.thinking, request.speculation
    probe_room = len(plan.probe_ids) + plan.answer_tokens if plan is not None and plan.early_exit else 0
    forced = len(plan.forced_ids) if plan is not None else 0
    lookahead = 0
    if speculation is not None or plan is not None:
        lookahead = 1 + max(speculation.num_draft if speculation else 0, forced, probe_room)
    max_prompt = int(request.prompt_lens.max())
    capacity = max_prompt + request.max_new_tokens + lookahead
    if config.compresses:  # a row's inputs stop at its KV limit: no room past it but a probe's
        capacity = KVCompressor.capacity_for(config, max_prompt, capacity) + probe_room
    return lookahead, capacity, probe_room


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
    capacity: int,
    draft_model: torch.nn.Module | None = None,
    free_bytes: int | None = None,
) -> int:
    """The slot count ``"auto"`` picks: as many rows as fit in ``free_bytes``, within ``[1, batch_size]``.

    Parameters
    ----------
    model : torch.nn.Module
        The target model (its KV geometry and dtype).
    config : DecodeConfig
        ``kv_budget`` / ``kv_policy`` decide the side buffers.
    batch_size : int
        Rows of the call (the most slots worth having).
    capacity : int
        Cache entries per slot (:func:`row_layout`).
    draft_model : torch.nn.Module, optional
        The assistant model, whose cache has as many slots.
    free_bytes : int, optional
        Memory to fill; by default :func:`free_bytes_for_slots` on the model's device.

    Raises
    ------
    ValueError
        When not even one row fits.
    """
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


def slots_for(model: torch.nn.Module, request, free_bytes: int | None = None) -> int:
    """The slot count of a call: ``request.decode_config.max_slots`` resolved, in ``[1, B]``.

    Raises
    ------
    ValueError
        ``"auto"`` and not even one row fits; or an option that needs the whole batch at once
        (``output_scores``/``output_logits``, stopping criteria without an EOS id) with fewer slots than rows.
    """
    config, batch_size = request.decode_config, request.batch_size
    if config.max_slots is None:
        return batch_size
    if config.max_slots == "auto":
        draft = request.speculation.assistant_model if request.speculation is not None else None
        slots = auto_slots(model, config, batch_size, row_layout(request)[1], draft, free_bytes)
    else:
        slots = min(int(config.max_slots), batch_size)
    if slots < batch_size:
        if request.output_scores or request.output_logits:
            raise ValueError(
                f"DecodeConfig.max_slots={config.max_slots!r} gives {slots} slots for {batch_size} rows: "
                "output_scores/output_logits hold one [B, V] tensor per step of the whole batch, which rows "
                "admitted later do not share; drop max_slots or the per-step outputs"
            )
        if request.stopping_criteria and not request.eos_token_ids:
            raise ValueError(
                f"DecodeConfig.max_slots={config.max_slots!r} with stopping criteria but no EOS token id: "
                "rows a criterion ends keep generating until every row is done (as transformers does), "
                "which needs the whole batch at once; set eos_token_id or drop max_slots"
            )
    return slots
