"""Per-slot state of one call, the rows still decoding, and what a step plans and emits.

Everything per row lives in buffers indexed by *slot* (``[slots, ...]``); ``rows`` (int32, on the device, with
its int64 and host copies) lists the slots in the forward batch. Rows leave in one place (:meth:`shrink`);
with continuous batching that is also where they would join.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from effdecode.generation.request import GenerationRequest


@dataclass
class Emission:
    """What the rows of a step emit (indexed like the step's rows).

    Attributes
    ----------
    tokens : torch.Tensor
        int64 ``[R, T]``: each row's run, left-aligned.
    counts : torch.Tensor
        int ``[R]``: tokens of the run (0 for a row in the middle of a probe).
    probe : ProbeRows or None
        The rows busy with a probe in the forward that gave this emission.
    rewind : torch.Tensor or None
        int64 ``[R]``: tokens taken back from the row's end first (a confident probe replacing its trigger).
    scores, logits : torch.Tensor or None
        float32 ``[R, V]`` processed scores and raw logits of a one-token step (stop criteria, outputs).
    """

    tokens: torch.Tensor
    counts: torch.Tensor
    probe: object | None = None
    rewind: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class StepPlan:
    """The inputs of one target forward: each row feeds ``q_lens[b] = 1 + d_b`` tokens, right-aligned."""

    input_ids: torch.Tensor  # int64 [R, T]
    positions: torch.Tensor  # int64 [R, T]
    q_lens: torch.Tensor  # int32 [R]
    drafts: torch.Tensor | None = None  # int64 [R, K]: what each row feeds after its last token
    draft_lens: torch.Tensor | None = None  # int32 [R]
    draft_probs: torch.Tensor | None = None  # [R, K, V] draft distributions (sampling)
    proposed: tuple | None = None  # (drafts, lengths) as the drafter proposed them (statistics, schedule)
    forced: tuple | None = None  # (forced [R, F], forced_counts [R]) of the thinking controller
    probe: object | None = None  # ProbeRows busy with a probe
    scores: list | None = None  # attention-score buffers for the eviction policy
    kv_bound: int = 0  # host bound of the rows' cache lengths after the forward
    last_only: bool = True  # the forward returns last-column logits (no row that is not probing drafts)
    chosen: torch.Tensor | None = None  # int64 [R]: greedy tokens a compiled step chose with its forward

    @property
    def num_cols(self) -> int:
        return self.input_ids.shape[1]


class DecodeState:
    """The call's output buffer, per-row token counts and the active rows.

    Parameters
    ----------
    request : GenerationRequest
    lookahead : int
        Most columns a step may write past a row's end.
    keep_history : bool
        Keep left-aligned histories (prompt without padding, then new tokens) for the drafters.
    """

    def __init__(self, request: GenerationRequest, lookahead: int, keep_history: bool) -> None:
        input_ids = request.input_ids
        device = input_ids.device
        self.device = device
        self.batch_size, self.prompt_width = input_ids.shape
        self.max_new = request.max_new_tokens
        self.pad = request.pad_token_id if request.pad_token_id is not None else 0
        width = self.prompt_width + self.max_new + lookahead + 1
        self.sequences = torch.full((self.batch_size, width), self.pad, dtype=torch.long, device=device)
        self.sequences[:, : self.prompt_width] = input_ids
        self.new_tokens = torch.zeros(self.batch_size, dtype=torch.long, device=device)
        self.width_bound = 0  # host-side bound of max(new_tokens)
        self.history = self.history_lens = None
        if keep_history:
            capacity = self.prompt_width + self.max_new + lookahead
            self.history = torch.zeros(self.batch_size, capacity, dtype=torch.long, device=device)
            columns = torch.arange(self.prompt_width, device=device)
            padding = (self.prompt_width - request.prompt_lens.long())[:, None]
            source = (columns[None, :] + padding).clamp(max=self.prompt_width - 1)
            self.history[:, : self.prompt_width] = input_ids.gather(1, source)
            self.history_lens = request.prompt_lens.clone()
        self.rows = torch.arange(self.batch_size, dtype=torch.int32, device=device)
        self.rows_long = self.rows.long()
        self.rows_host = np.arange(self.batch_size)
        self.ones = torch.ones(self.batch_size, dtype=torch.int32, device=device)  # never written
        self.forwards = 0  # target forwards so far (prefill included)
        self.row_forwards = torch.zeros(self.batch_size, dtype=torch.long, device=device)  # set on leaving

    def ends(self) -> torch.Tensor:
        """int64 ``[R]``: each active row's last column in ``sequences``."""
        return self.prompt_width + self.new_tokens[self.rows_long] - 1

    def rewind(self, rewind: torch.Tensor) -> None:
        """Take ``rewind`` (int64 ``[R]``) tokens back from the active rows' ends."""
        self.new_tokens[self.rows_long] -= rewind
        if self.history_lens is not None:
            self.history_lens[self.rows_long] -= rewind.to(self.history_lens.dtype)

    def append(self, emitted: torch.Tensor, counts: torch.Tensor) -> None:
        """Write each active row's first ``counts[b]`` tokens of ``emitted`` ``[R, T]`` after its end.

        All ``T`` columns are written (the buffers have room past every row's end); columns past a row's count
        keep what they held. No host sync.
        """
        rows = self.rows_long
        targets = [(self.sequences, self.prompt_width + self.new_tokens[rows])]
        if self.history is not None:
            targets.append((self.history, self.history_lens[rows].long()))
        if emitted.shape[1] == 1:  # one token per row: every row emits exactly it
            for buffer, start in targets:
                buffer[rows, start] = emitted[:, 0]
        else:
            offsets = torch.arange(emitted.shape[1], device=self.device)[None, :]
            keep_new = offsets < counts[:, None]
            for buffer, start in targets:
                columns = start[:, None] + offsets
                current = buffer[rows[:, None], columns]
                buffer[rows[:, None], columns] = torch.where(keep_new, emitted, current)
        self.new_tokens[rows] += counts.long()
        if self.history_lens is not None:
            self.history_lens[rows] += counts.to(self.history_lens.dtype)
        self.width_bound += emitted.shape[1]

    def history_for_processors(self) -> torch.Tensor:
        """``[R, L]`` the active rows' tokens so far, prompt padding included (as transformers has them)."""
        width = self.prompt_width + min(self.width_bound, self.max_new)
        return self.sequences[:, :width].index_select(0, self.rows_long)

    def shrink(self, stay: np.ndarray) -> torch.Tensor:
        """Rows where ``stay`` (bool ``[R]``, host) is False leave; returns the device index of the rest."""
        leaving = self.rows_long[torch.as_tensor(np.flatnonzero(~stay), device=self.device)]
        self.row_forwards[leaving] = self.forwards
        keep = torch.as_tensor(np.flatnonzero(stay), device=self.device)
        self.rows = self.rows.index_select(0, keep)
        self.rows_long = self.rows.long()
        self.rows_host = self.rows_host[stay]
        return keep

    def result(self) -> torch.Tensor:
        """``[B, T0 + longest]`` sequences: the prompts, then each row's tokens (<= ``max_new_tokens``)."""
        self.row_forwards[self.rows_long] = self.forwards
        self.new_tokens.clamp_(max=self.max_new)  # a committed probe may run past max_new_tokens
        columns = torch.arange(self.sequences.shape[1], device=self.device)[None, :]
        self.sequences.masked_fill_(columns >= self.prompt_width + self.new_tokens[:, None], self.pad)
        return self.sequences[:, : self.prompt_width + int(self.new_tokens.max())]
