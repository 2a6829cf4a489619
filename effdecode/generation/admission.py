"""Continuous batching helpers: per-request statistics gathered as rows leave their slots, and the step
emission that admitted rows join.

With ``DecodeConfig.max_slots`` a slot holds several requests over a call, one after another, so the
participants' per-slot counters (draft tokens, evictions, thinking tokens, ...) are read when a row leaves
(:meth:`RowStats.leave`, from :meth:`DecodeCall.shrink` and at the end) into per-request lists. Nothing here
reads device memory on the host: device counters are gathered on the device, host ones on the host.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from effdecode.generation.state import Emission


class RowStats:
    """Per-request statistics of one call (indexed by request row), filled as rows leave their slots.

    Parameters
    ----------
    batch_size : int
        Request rows of the call.
    device : torch.device
    call : DecodeCall
        Its participants (drafting, compression, thinking), state and target cache.
    """

    def __init__(self, batch_size: int, device: torch.device, call) -> None:
        self.call = call
        zeros = lambda: torch.zeros(batch_size, dtype=torch.long, device=device)  # noqa: E731
        self.proposed = zeros() if call.drafting is not None else None
        self.accepted = zeros() if call.drafting is not None else None
        self.thought = zeros() if call.thinking is not None else None
        self.early_exits = zeros() if call.thinking is not None else None
        self.evicted = np.zeros(batch_size, dtype=np.int64)
        self.kv_peak = torch.zeros((), dtype=torch.int32, device=device)
        self.first_token_s = np.zeros(batch_size)
        self.finish_s = np.zeros(batch_size)

    def first_token(self, requests: np.ndarray) -> None:
        """Rows ``requests`` (host) just chose their first token."""
        self.first_token_s[requests] = time.perf_counter() - self.call.started

    def leave(self, slots: np.ndarray, requests: np.ndarray) -> None:
        """Rows in ``slots`` (host) leave: their counters go to request rows ``requests``; the caller's
        ``on_rows_finished`` hears of them."""
        if slots.size == 0:
            return
        call = self.call
        self.finish_s[requests] = time.perf_counter() - call.started
        device = call.state.device
        slots_dev = torch.as_tensor(slots, device=device)
        requests_dev = torch.as_tensor(requests, device=device)
        pairs = []
        if call.drafting is not None:
            pairs += [(self.proposed, call.drafting.proposed), (self.accepted, call.drafting.accepted)]
        if call.thinking is not None:
            pairs += [(self.thought, call.thinking.thought), (self.early_exits, call.thinking.early_exits)]
        for out, per_slot in pairs:
            out[requests_dev] = per_slot.index_select(0, slots_dev)
        if call.compression is not None:
            self.evicted[requests] = call.compression.compressor.evicted[slots]
        else:
            lens = call.target.cache.cache_lens.index_select(0, slots_dev)
            self.kv_peak = torch.maximum(self.kv_peak, lens.max())
        callback = call.request.on_rows_finished
        if callback is not None:  # (harvested already: the requests' rows hold their counts)
            new_tokens = call.state.out_new_tokens.index_select(0, requests_dev).clamp(max=call.state.max_new)
            callback(requests.astype(np.int64), new_tokens.cpu().numpy())

    def fill(self, stats) -> None:
        """Put the per-request lists into ``stats`` (a :class:`~effdecode.stats.GenerationStats`)."""
        if self.proposed is not None:
            stats.proposed_draft_tokens = self.proposed.tolist()
            stats.accepted_draft_tokens = self.accepted.tolist()
        if self.thought is not None:
            stats.thinking_tokens = self.thought.tolist()
            stats.early_exits = self.early_exits.tolist()
        if self.call.compression is not None:
            stats.evicted_tokens = self.evicted.tolist()
        else:
            stats.kv_peak_tokens = int(self.kv_peak)
        stats.first_token_s = self.first_token_s.tolist()
        stats.finish_s = self.finish_s.tolist()


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if tensor.shape[1] >= width:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], width - tensor.shape[1])], dim=1)


def join_emissions(step: Emission, first: Emission) -> Emission:
    """The step's emission ``[R, T]`` followed by admitted rows' first tokens ``[A, 1]``: ``[R + A, T]``.

    The admitted rows are free (never probing), rewind nothing, and keep their scores/logits only where the
    step's rows have them too (one-token steps).
    """
    width = max(step.tokens.shape[1], first.tokens.shape[1])
    tokens = torch.cat([_pad_columns(step.tokens, width), _pad_columns(first.tokens, width)])
    counts = torch.cat([step.counts.to(first.counts.dtype), first.counts])
    rewind = None
    if step.rewind is not None:
        rewind = torch.cat([step.rewind, step.rewind.new_zeros(first.tokens.shape[0])])
    scores = logits = None
    if step.scores is not None and first.scores is not None:
        scores = torch.cat([step.scores, first.scores.to(step.scores.dtype)])
    if step.logits is not None and first.logits is not None:
        logits = torch.cat([step.logits, first.logits.to(step.logits.dtype)])
    return Emission(tokens, counts, step.probe, rewind, scores, logits)
