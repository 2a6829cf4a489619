"""The KV-compressor participant: which rows are compacted before a forward, and what the compressor learns
after each step (entries kept, a verify forward's attention scores, decided probes).

Wraps :class:`effdecode.compression.kv_compressor.KVCompressor`; its host bookkeeping follows the target
cache from the step's sync, so no extra device read is needed.
"""

from __future__ import annotations

import numpy as np
import torch

from effdecode.cache import SlotKVCache
from effdecode.compression.kv_compressor import KVCompressor
from effdecode.config import DecodeConfig


class Compression:
    """KV eviction for one call.

    Parameters
    ----------
    config : DecodeConfig
        With ``kv_budget`` set.
    cache : SlotKVCache
        The target cache.
    prompt_lens : torch.Tensor
        int32 ``[slots]`` (zeros until :meth:`admit` fills a slot).
    thinking : ThinkingController or None
        For the thinking spans (``kv_think_only``) and probe states (a probing row is never compacted).
    """

    def __init__(self, config: DecodeConfig, cache: SlotKVCache, prompt_lens: torch.Tensor, thinking) -> None:
        spans = (lambda: thinking.spans) if thinking is not None else None
        self.compressor = KVCompressor(config, cache, prompt_lens, spans)
        self.cache = cache
        self.thinking = thinking
        self.deer = thinking is not None and thinking.plan.early_exit
        # scores (and whether the observation window had opened) of probing slots, restored on roll back
        self.probe_scores: dict[int, tuple[torch.Tensor, bool]] = {}

    def admit(self, rows: np.ndarray, prompt_lens: torch.Tensor, lens_host: np.ndarray) -> None:
        """Slots ``rows`` (host) start over with new prompts (``prompt_lens`` ``[A]``, device and host)."""
        self.compressor.admit(rows, prompt_lens, lens_host)
        for slot in rows.tolist():
            self.probe_scores.pop(slot, None)

    @property
    def nbytes(self) -> int:
        return self.compressor.nbytes

    @property
    def limit(self) -> int:
        return self.compressor.limit

    def prefill_scores(self, rows_host: np.ndarray, prompt_lens_host: np.ndarray) -> list | None:
        """Score buffers for the prefill of admitted slots ``rows_host`` (after :meth:`admit`)."""
        compressor = self.compressor
        held = compressor.lens[rows_host].copy()
        # The observation-window test counts the prompt as incoming into an empty row: with the prompt's
        # length already in ``lens`` (set on admission) a row would look past its window, and every row of the
        # prefill would record attention mass its window never sees (the output then depended on the batch).
        compressor.lens[rows_host] = 0
        try:
            return compressor.scores_for(rows_host, prompt_lens_host)
        finally:
            compressor.lens[rows_host] = held

    def room(self, rows: torch.Tensor) -> torch.Tensor:
        """int ``[R]``: entries slots ``rows`` (int64) may still gain before their KV limit."""
        return self.compressor.limit - self.cache.cache_lens[rows]

    def after_sync(self, rows_host: np.ndarray, kept_host: np.ndarray, first: bool, decided=None) -> None:
        """After the step's sync: a verify forward's kept scores, the entries kept, decided probes.

        ``kept_host`` ``[R]``: entries each row kept of the last forward; ``decided`` (slots, confident) of
        the probes decided in it.
        """
        compressor = self.compressor
        if compressor.has_pending_scores:  # the verify forward's kept tokens are known now
            compressor.commit_scores(kept_host)
        if not first:
            compressor.advance(rows_host, kept_host)
        if decided is None:
            return
        slots, confident = decided
        for slot, kept_probe in zip(slots.tolist(), confident.tolist(), strict=True):
            saved = self.probe_scores.pop(slot, None)
            if saved is not None and not kept_probe:  # a rolled-back probe leaves no attention mass
                compressor.scores[:, slot], compressor.window_open[slot] = saved
        if slots.size:  # the cache keeps the row's entries, plus the probe text when confident
            compressor.lens[slots] = self.thinking.base_host[slots] + self.thinking.probe_width * confident

    def before_forward(self, rows_host: np.ndarray) -> None:
        """Compact the rows at their KV limit (never a probing row)."""
        candidates = rows_host if not self.deer else rows_host[self.thinking.stage[rows_host] == 0]
        self.compressor.compact(self.compressor.due(candidates))

    def start_probes(self, rows_host: np.ndarray) -> None:
        """Rows starting a probe: save their scores; a probe replacing its trigger starts over its entries."""
        thinking, compressor = self.thinking, self.compressor
        if compressor.scores is not None:
            for slot in rows_host[thinking.starting[rows_host]].tolist():
                self.probe_scores[slot] = (compressor.scores[:, slot].clone(), compressor.window_open[slot])
        compressor.lens[rows_host] -= thinking.cache_rewind(rows_host)
        thinking.base_host[rows_host] = np.where(
            thinking.starting[rows_host], compressor.lens[rows_host], thinking.base_host[rows_host]
        )

    def step_scores(self, rows_host: np.ndarray, num_cols: int, one_token: bool) -> tuple[list | None, int]:
        """Score buffers for the forward (immediate for one-token steps, else deferred until the kept
        tokens are known) and the host bound of the rows' cache lengths after it."""
        compressor = self.compressor
        bound = int(compressor.lens[rows_host].max()) + num_cols
        if one_token:
            return compressor.scores_for(rows_host, 1), bound
        return compressor.deferred_scores_for(rows_host, num_cols), bound

    def finish(self, stats) -> None:
        stats.kv_peak_tokens = self.compressor.peak  # (evicted_tokens per request: RowStats)
