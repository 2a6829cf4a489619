"""The target model's forward over the slot cache: the one place a step's forward runs.

:meth:`TargetModel.forward` takes the rows and their right-aligned inputs and returns logits; it replays
a captured step (:mod:`effdecode.generation.graphs`) where one applies and runs eagerly otherwise, so
swapping in a compiled step changes this function only. Prefill is its own method: it takes the slots to fill.
"""

from __future__ import annotations

import torch

from effdecode.cache import SlotKVCache
from effdecode.generation.graphs import DecodeGraphs
from effdecode.generation.steps import forward_logits, prefill
from effdecode.ops.attention import SlotBatch
from effdecode.ops.sampling import SamplingParams


class TargetModel:
    """The target model, its slot cache and (optionally) its captured steps for one call.

    Parameters
    ----------
    model : torch.nn.Module
        The HF causal LM.
    cache : SlotKVCache
        Its cache for the call (``capacity`` entries per slot).
    graphs : DecodeGraphs or None
        Captured steps to replay, or None to run every forward eagerly.
    backend : str
        Attention backend.
    """

    def __init__(self, model, cache: SlotKVCache, graphs: DecodeGraphs | None, backend: str) -> None:
        self.model = model
        self.cache = cache
        self.graphs = graphs
        self.backend = backend
        self.chosen: torch.Tensor | None = None  # int64 [R]: tokens the last forward chose in its graph
        self.chosen_scores: torch.Tensor | None = None  # float32 [R, V]: the warped scores it sampled from

    def prefill(
        self,
        input_ids: torch.Tensor,
        prompt_lens: torch.Tensor,
        scores: list | None = None,
        inputs_embeds: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        lens_host=None,
    ) -> torch.Tensor:
        """Fill ``slots`` (int64 ``[A]``; None: ``0 .. A-1``) with the left-padded prompts ``[A, T0]`` (fed as
        ``inputs_embeds`` ``[A, T0, H]`` where given), in one forward; returns the logits ``[A, V]``.
        ``lens_host``: ``prompt_lens`` on the host, if known."""
        return prefill(
            self.model, self.cache, input_ids, prompt_lens, self.backend, scores, inputs_embeds, slots,
            lens_host,
        )  # fmt: skip

    def forward(
        self,
        rows: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        q_lens: torch.Tensor,
        kv_bound: int,
        leading: bool,
        scores: list | None = None,
        last_only: bool = True,
        choose: bool = False,
        slot_span: int = 0,
        host_rows: tuple | None = None,
        sampling: SamplingParams | None = None,
    ) -> torch.Tensor:
        """Logits of one step: the last column's ``[R, V]`` (``last_only``), else all columns' ``[R, T, V]``.

        Parameters
        ----------
        rows : torch.Tensor
            int32 ``[R]`` slots.
        input_ids, positions : torch.Tensor
            int64 ``[R, T]``, each row's ``q_lens[b]`` tokens right-aligned.
        q_lens : torch.Tensor
            int32 ``[R]``.
        kv_bound : int
            Host bound of the rows' cache lengths after the forward.
        leading : bool
            ``rows`` is ``arange(R)`` (lets the attention op skip the gather).
        slot_span : int
            Host bound of ``rows`` (0: unknown); see :class:`~effdecode.ops.slot_batch.SlotBatch`.
        host_rows : tuple of np.ndarray, optional
            Host ``(slots, length bounds)`` of the rows; see :class:`~effdecode.ops.slot_batch.SlotBatch`.
        scores : list of torch.Tensor, optional
            Attention-score buffers of the eviction policy (such forwards run eagerly).
        choose : bool
            A one-token step may pick each row's greedy token in its compiled graph (``self.chosen``, else
            None); only where nothing stands between the forward and the argmax (``chooses_in_graph``).
        sampling : SamplingParams, optional
            With ``choose``: the step samples instead, warping with these and drawing from the slots'
            streams in its compiled graph (``self.chosen``, the warped scores in ``self.chosen_scores``); only
            where the warpers are all that stands between the forward and the draw (``samples_in_graph``).
        """
        num_cols = input_ids.shape[1]
        self.chosen = self.chosen_scores = None
        if self.graphs is not None and scores is None:
            graphs, model, backend = self.graphs, self.model, self.backend
            if num_cols == 1 and choose and graphs.compile:
                out = graphs.run_and_pick(
                    model, rows, input_ids[:, 0], positions[:, 0], backend, kv_bound, sampling
                )
                logits, self.chosen_scores, self.chosen = out if out is not None else (None, None, None)
            elif num_cols == 1:
                logits = graphs.run(model, rows, input_ids[:, 0], positions[:, 0], backend, kv_bound=kv_bound)
            else:
                logits = graphs.run(model, rows, input_ids, positions, backend, q_lens, kv_bound)
            if logits is not None:
                return logits[:, -1] if last_only and num_cols > 1 else logits
        cache = self.cache
        batch = SlotBatch(
            rows,
            cache.cache_lens,
            q_lens,
            kv_len_bound=min(kv_bound, cache.capacity),
            backend=self.backend,
            rows_are_leading_slots=leading,
            q_full=num_cols == 1,
            slot_span=slot_span,
            host_rows=host_rows,
        )
        return forward_logits(self.model, cache, batch, input_ids, positions, last_only, scores)

    def advance(self, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """Slots ``rows`` (int64 ``[R]``) keep ``counts`` (``[R]``) more entries of the last forward."""
        self.cache.cache_lens.index_add_(0, rows, counts.to(torch.int32))
        self.cache.positions.index_add_(0, rows, counts.long())
