"""The batch description of one forward over the slot cache, shared by every attention implementation.

Its own module so that :mod:`effdecode.ops.attention` (the dispatcher) and the implementations it dispatches
to (:mod:`effdecode.ops.flash_attention`, the Triton kernels) all import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SlotBatch:
    """Per-step batch description shared by every layer of one forward.

    Attributes
    ----------
    rows : torch.Tensor
        int32 ``[B]``, slot of each row.
    cache_lens : torch.Tensor
        int32 ``[slots]``, entries held per slot before this forward.
    q_lens : torch.Tensor
        int32 ``[B]``, valid (right-aligned) new tokens per row.
    kv_len_bound : int
        Host-side upper bound of ``max(cache_lens[rows] + q_lens)``; lets the torch path slice the cache
        without a device sync. Must not be smaller than the true maximum.
    backend : str
        Requested attention implementation ("auto", "torch", "triton", "cuda").
    rows_are_leading_slots : bool
        Host-side fact: ``rows == arange(B)``. Lets the torch path read the cache through a view.
    q_full : bool
        Host-side fact: every ``q_lens[b] == T`` (decode steps, unpadded prefill). Lets the torch path
        write without locating valid tokens.
    slot_span : int
        Host-side bound: every row's slot is below it (0: unknown). When the rows fill most of the leading
        ``slot_span`` slots (continuous batching refills freed slots, in any order), the torch path attends
        over that view of the cache instead of gathering the rows' keys and values every layer.
    host_rows : tuple of np.ndarray, optional
        Host-side ``(slots [B], bounds [B])``: each row's slot and an upper bound of its cache length after
        the forward. Where rows' lengths differ much (continuous batching), the torch path then attends row
        by row over each row's own length instead of padding every row to ``kv_len_bound``.
    """

    rows: torch.Tensor
    cache_lens: torch.Tensor
    q_lens: torch.Tensor
    kv_len_bound: int
    backend: str = "auto"
    rows_are_leading_slots: bool = False
    q_full: bool = False
    slot_span: int = 0
    host_rows: tuple | None = None
    # Derived tensors shared by all layers of the step (write indices, masks); filled on first use.
    derived: dict = field(default_factory=dict)
