"""Per-row KV eviction inside the decode loops: when to compact which rows, and the side buffers it needs.

A row is compacted back to ``kv_budget`` entries just before a forward that would take it past
``kv_budget + compress_every`` (the *limit*), so it never holds more than the limit and the cache is allocated
for exactly that. The schedule depends only on each row's own token count, so plain and speculative decoding
compact a row at the same tokens (speculation caps a row's drafts at the limit).

Side buffers, ``[layers, slots, kv_heads, capacity]`` like the cache without ``head_dim``:

- ``scores`` (float32, attention-based policies): the attention mass each entry received, which the attention
  kernel accumulates during the forwards that emit scores. "h2o" accumulates over the whole generation (kept
  entries carry their mass through a compaction); "snapkv"/"rkv" only over a row's *observation window*, its
  last ``min(kv_window, compress_every)`` queries before a compaction: a row's scores are zeroed as its window
  opens, and forwards emit scores only while some row's window is open. A speculative verify forward counts
  only the tokens a row keeps: it records (``deferred_scores_for``) and adds the kept columns once acceptance
  is known (``commit_scores``), so every policy evicts under speculation exactly what plain decoding evicts.
- ``entry_positions`` (int32): the RoPE position of every entry, which compaction scrambles per layer and
  head. Entries appended since a row's last compaction are contiguous in index and position, so they are
  filled in only when the row is compacted next (``fresh_from``), never per step.

Host bookkeeping: the engine reports how many entries each row gained (``advance``); that lets it know which
rows are due without reading device memory.
"""

from __future__ import annotations

import numpy as np
import torch

from effdecode.cache import SlotKVCache
from effdecode.compression.policies import protection_masks, select_keep
from effdecode.config import DecodeConfig
from effdecode.ops.attention import PendingScores
from effdecode.ops.compaction import compact_kv

_SCORED_POLICIES = frozenset({"h2o", "snapkv", "rkv"})


class KVCompressor:
    """Decides and performs the compactions of one ``generate`` call.

    Parameters
    ----------
    config : DecodeConfig
        ``kv_budget`` (not None), ``kv_policy``, ``kv_window``, ``kv_sinks``, ``compress_every``,
        ``kv_protect_prompt``, ``kv_think_only``.
    cache : SlotKVCache
        The target's cache, allocated with capacity >= :meth:`capacity_for`.
    prompt_lens : torch.Tensor
        int32 ``[slots]`` real prompt tokens per row (device).
    think_spans : callable, optional
        Returns int64 ``[slots, 2]`` (start, end) positions of each row's thinking span (device); required
        with ``kv_think_only``.
    """

    def __init__(
        self,
        config: DecodeConfig,
        cache: SlotKVCache,
        prompt_lens: torch.Tensor,
        think_spans=None,
    ) -> None:
        if config.kv_budget is None:
            raise ValueError("KVCompressor needs DecodeConfig.kv_budget")
        if config.kv_think_only and think_spans is None:
            raise ValueError("kv_think_only needs the rows' thinking spans")
        self.config = config
        self.cache = cache
        self.budget = config.kv_budget
        self.limit = config.kv_budget + config.compress_every
        self.policy = config.kv_policy
        self.observe = min(config.kv_window, config.compress_every)
        self.prompt_lens = prompt_lens
        self.think_spans = think_spans
        slots = cache.num_slots
        self.lens = prompt_lens.cpu().numpy().astype(np.int64)  # entries per slot, known on the host
        self.fresh_from = np.zeros(slots, dtype=np.int64)  # entries past this have contiguous positions
        self.evicted = np.zeros(slots, dtype=np.int64)
        # "snapkv"/"rkv": whether a row's observation window opened since its admission or last compaction.
        # A forward emits scores for every row while any row's window is open; a row whose window then opens
        # has them zeroed, but one whose window never opens before its compaction (kv_window=0: the window
        # starts at the limit) would be compacted on mass that other rows' forwards gave it, which decoding
        # it alone never does. Its scores are zeroed at compaction instead.
        self.window_open = np.zeros(slots, dtype=bool)
        self.peak = int(self.lens.max()) if slots else 0
        shape = (cache.geometry.num_layers, slots, cache.geometry.kv_heads, cache.capacity)
        self.scores = (
            torch.zeros(shape, dtype=torch.float32, device=cache.device)
            if self.policy in _SCORED_POLICIES
            else None
        )
        self.entry_positions = torch.zeros(shape, dtype=torch.int32, device=cache.device)
        self._pending: tuple | None = None  # (per-layer PendingScores, rows, cache lengths before)

    def admit(self, rows: np.ndarray, prompt_lens: torch.Tensor, lens_host: np.ndarray) -> None:
        """Slots ``rows`` (host) now hold new rows whose prompts (``prompt_lens`` int ``[A]`` on the device,
        ``lens_host`` on the host) are about to be prefilled: their bookkeeping starts over."""
        slots = torch.as_tensor(rows, device=self.cache.device)
        self.prompt_lens[slots] = prompt_lens.to(self.prompt_lens.dtype)
        self.lens[rows] = lens_host
        self.fresh_from[rows] = 0
        self.evicted[rows] = 0
        self.window_open[rows] = False
        if self.scores is not None:
            self.scores[:, slots] = 0.0
        if rows.size:
            self.peak = max(self.peak, int(self.lens[rows].max()))

    @staticmethod
    def capacity_for(config: DecodeConfig, max_prompt: int, needed: int) -> int:
        """Cache capacity for a call that needs ``needed`` entries per row without eviction."""
        limit = config.kv_budget + config.compress_every
        return min(needed, max(max_prompt, limit))

    @property
    def nbytes(self) -> int:
        """Bytes of the side buffers (counted in ``kv_peak_bytes``)."""
        total = self.entry_positions.numel() * self.entry_positions.element_size()
        if self.scores is not None:
            total += self.scores.numel() * self.scores.element_size()
        return total

    def scores_for(self, rows: np.ndarray, incoming: np.ndarray) -> list[torch.Tensor] | None:
        """Per-layer score buffers for a forward adding ``incoming`` entries to slots ``rows``, or None.

        For "snapkv"/"rkv", zeroes the scores of rows whose observation window opens in this forward.
        """
        if self.scores is None:
            return None
        if self.policy == "h2o":
            return list(self.scores.unbind(0))
        window_start = self.limit - self.observe
        lens = self.lens[rows]
        opening = rows[(lens <= window_start) & (lens + incoming > window_start)]
        if opening.size:
            self.scores[:, torch.as_tensor(opening, device=self.scores.device)] = 0.0
            self.window_open[opening] = True
        if not bool((lens + incoming > window_start).any()):
            return None
        return list(self.scores.unbind(0))

    def deferred_scores_for(self, rows: np.ndarray, incoming: int) -> list[PendingScores] | None:
        """Per-layer :class:`PendingScores` for a verify forward of up to ``incoming`` tokens a row, or None.

        A speculative step must count the attention of the tokens it keeps only: rejected drafts' queries
        would give other entries mass that plain decoding never gives them (and the entries they wrote would
        keep it). So the forward records, and :meth:`commit_scores` adds the kept columns once they are known.
        """
        if self.scores is None:
            return None
        if self.policy != "h2o" and not bool((self.lens[rows] + incoming > self.limit - self.observe).any()):
            return None  # no row's observation window can open in this forward
        pending = [PendingScores(layer_scores) for layer_scores in self.scores.unbind(0)]
        self._pending = (pending, rows, self.cache.cache_lens.clone())
        return pending

    def commit_scores(self, kept: np.ndarray) -> None:
        """Add the pending verify forward's scores of the ``kept`` ``[rows]`` leading tokens of each row.

        Call before :meth:`advance` and before anything writes the cache. "snapkv"/"rkv" count only queries
        inside a row's observation window, and zero a row's scores where its window opens, as plain decoding
        does one token at a time.
        """
        pending, rows, cache_lens_before = self._pending
        self._pending = None
        lens = self.lens[rows]
        col_from = np.zeros_like(lens)
        if self.policy != "h2o":
            window_start = self.limit - self.observe
            col_from = np.maximum(window_start - lens, 0)
            opening = rows[(lens <= window_start) & (lens + kept > window_start)]
            if opening.size:
                self.scores[:, torch.as_tensor(opening, device=self.scores.device)] = 0.0
                self.window_open[opening] = True
        if not bool((kept > col_from).any()):
            return
        device = self.cache.device
        col_from = torch.as_tensor(col_from, dtype=torch.int32, device=device)
        col_to = torch.as_tensor(kept, dtype=torch.int32, device=device)
        for layer in pending:
            layer.commit(cache_lens_before, col_from, col_to)

    @property
    def has_pending_scores(self) -> bool:
        """Whether a verify forward's scores wait for :meth:`commit_scores`."""
        return self._pending is not None

    def advance(self, rows: np.ndarray, counts: np.ndarray | int) -> None:
        """Slots ``rows`` kept ``counts`` more entries (after a forward's tokens were accepted)."""
        self.lens[rows] += counts
        if rows.size:
            self.peak = max(self.peak, int(self.lens[rows].max()))

    def due(self, rows: np.ndarray) -> np.ndarray:
        """Slots among ``rows`` that must be compacted before their next forward (they reached the limit)."""
        return rows[self.lens[rows] >= self.limit]

    def compact(self, rows: np.ndarray) -> None:
        """Evict down to ``kv_budget`` entries in slots ``rows`` (every layer; a selection per layer/head)."""
        if rows.size == 0:
            return
        cache = self.cache
        device = cache.device
        slots = torch.as_tensor(rows, device=device, dtype=torch.long)
        lens = self.lens[rows]
        width = int(lens.max())
        lengths = torch.as_tensor(lens, device=device)
        next_positions = cache.positions[slots]
        # Entries appended since the row's last compaction: position = next position - (len - index).
        index = torch.arange(width, device=device)
        fresh = index[None, :] >= torch.as_tensor(self.fresh_from[rows], device=device)[:, None]
        contiguous = next_positions[:, None] - lengths[:, None] + index[None, :]  # [R, C]
        stored = self.entry_positions[:, slots, :, :width].long()  # [L, R, H, C]
        positions = torch.where(fresh[None, :, None, :], contiguous[None, :, None, :], stored)

        config = self.config
        spans = self.think_spans()[slots] if self.think_spans is not None else None
        must_keep, prefer_keep = protection_masks(
            positions,
            lengths,
            next_positions,
            self.prompt_lens[slots],
            spans if spans is not None else torch.zeros(len(rows), 2, dtype=torch.long, device=device),
            config.kv_sinks,
            config.kv_window,
            config.kv_protect_prompt,
            config.kv_think_only,
        )
        if self.scores is not None and self.policy != "h2o":
            closed = rows[~self.window_open[rows]]  # (see window_open)
            if closed.size:
                self.scores[:, torch.as_tensor(closed, device=device)] = 0.0
            self.window_open[rows] = False
        scores = self.scores[:, slots, :, :width] if self.scores is not None else None
        keys = cache.key_buffer[:, slots, :, :width] if self.policy == "rkv" else None
        keep_index, keep_lens = select_keep(
            self.policy, keys, scores, positions, lengths, must_keep, prefer_keep, self.budget
        )
        compact_kv(
            cache.key_buffer,
            cache.value_buffer,
            cache.cache_lens,
            slots.to(torch.int32),
            keep_index,
            keep_lens,
            backend=config.attn_backend,
        )
        kept = keep_index.long()
        self.entry_positions[:, slots, :, : self.budget] = positions.gather(3, kept).to(torch.int32)
        if self.scores is not None:
            if self.policy == "h2o":
                self.scores[:, slots, :, : self.budget] = scores.gather(3, kept)
            self.scores[:, slots, :, self.budget :] = 0.0
        kept_lens = np.minimum(lens, self.budget)
        self.evicted[rows] += lens - kept_lens
        self.lens[rows] = kept_lens
        self.fresh_from[rows] = kept_lens
