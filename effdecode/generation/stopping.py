"""Stop logic of the decode loop: EOS, stop strings / stopping criteria, ``max_new_tokens``, ``max_time``.

A row's run ends at its first EOS (a drafted, forced or probe token alike) and at the first token after which
a stopping criterion holds; the row then leaves the batch. transformers pads a finished row only when it knows
an EOS token; without one, a row a criterion ended keeps generating until every row is done, as there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from effdecode.generation.request import GenerationRequest
from effdecode.generation.state import DecodeState
from effdecode.generation.steps import right_aligned_windows
from effdecode.generation.user_hooks import criteria_hit, length_groups, live_view


class StopLogic:
    """Decides where each row's run ends and which rows are done.

    Parameters
    ----------
    request : GenerationRequest
    eos_ids : torch.Tensor
        int64 ``[E]`` EOS ids (may be empty).
    started : float
        ``time.perf_counter()`` at the start of the call (``max_time``).
    """

    def __init__(
        self,
        request: GenerationRequest,
        eos_ids: torch.Tensor,
        started: float,
        agree: Callable[[Any], Any] | None = None,
        slots: int | None = None,
    ) -> None:
        # Under tensor parallel, host decisions read off the clock or a user criterion are OR-ed over the
        # ranks (effdecode.distributed.agree_any), or one rank would run a forward the others skip.
        self.agree = agree if agree is not None else (lambda flag: flag)
        self.criteria = request.stopping_criteria
        self.eos_ids = eos_ids
        self.max_new = request.max_new_tokens
        self.deadline = started + request.max_time if request.max_time is not None else None
        self.rows_leave = eos_ids.numel() > 0
        slots = request.input_ids.shape[0] if slots is None else slots
        self.unfinished = (
            None if self.rows_leave else torch.ones(slots, dtype=torch.bool, device=eos_ids.device)
        )

    def admit(self, slots: torch.Tensor) -> None:
        """Rows new in ``slots`` (int64) are unfinished."""
        if self.unfinished is not None:
            self.unfinished[slots] = True

    def cut_runs(
        self, state: DecodeState, emitted: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Before the append: ``(counts, finished)`` with runs ``[R, T]`` cut at their first EOS and, for runs
        of several tokens, at the first token after which a criterion holds."""
        counts, finished = self._cut_at_eos(emitted, counts)
        if self.criteria and emitted.shape[1] > 1:
            counts, finished = self._cut_at_criteria(state, emitted, counts, finished)
        return counts, finished

    def _cut_at_eos(self, emitted: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.rows_leave:
            return counts, torch.zeros_like(counts, dtype=torch.bool)
        if emitted.shape[1] == 1:  # one token per row: every row emits it
            return counts, torch.isin(emitted[:, 0], self.eos_ids)
        present = torch.arange(emitted.shape[1], device=emitted.device)[None, :] < counts[:, None]
        is_eos = torch.isin(emitted, self.eos_ids) & present
        finished = is_eos.any(dim=1)
        first = is_eos.long().argmax(dim=1)
        return torch.where(finished, first + 1, counts).to(counts.dtype), finished

    def _cut_at_criteria(self, state, emitted, counts, finished):
        """End each run at the first token after which a criterion holds (criteria see each row's window)."""
        counts, finished = counts.clone(), finished.clone()
        ends = state.ends()  # column of each row's last appended token
        width = min(state.sequences.shape[1], state.prompt_width + state.width_bound + emitted.shape[1])
        extended = state.sequences[:, :width].index_select(0, state.rows_long)
        local = torch.arange(extended.shape[0], device=extended.device)
        pending = torch.ones_like(finished)
        for j in range(emitted.shape[1]):
            present = pending & (j < counts)
            if not bool(present.any()):
                break
            column = (ends + 1 + j).clamp(max=width - 1)
            extended[local, column] = torch.where(present, emitted[:, j], extended[local, column])
            windows = right_aligned_windows(extended, local, ends + 1 + j, width, state.pad)
            # transformers' view: the whole batch (rows that left: their tokens, then pads), row i is row i.
            full = state.full_view(width, windows)
            hit = self.agree(criteria_hit(self.criteria, full, None, state.requests_long)) & present
            counts = torch.where(hit, j + 1, counts)
            finished |= hit
            pending &= ~hit
        return counts, finished

    def after_append(
        self,
        state: DecodeState,
        finished: torch.Tensor,
        one_token: bool,
        scores: torch.Tensor | None,
        uniform: bool = False,
    ) -> torch.Tensor:
        """bool ``[R]``: rows that leave the batch after this step's append.

        One-token steps check the criteria here, on the whole batch with the step's scores (as transformers
        does: :mod:`effdecode.generation.user_hooks`); every row leaves at ``max_new_tokens`` (``uniform``:
        rows advance together, the caller checks that on the host).
        """
        if self.criteria and one_token:  # transformers' view: the whole batch, row i always row i
            hit = torch.zeros_like(finished)
            for width, index in length_groups(state, state.rows_long):  # (one view unless rows are ragged)
                group_hit = criteria_hit(self.criteria, live_view(state, width), scores, state.requests_long)
                if index is None:
                    hit = group_hit
                else:
                    hit = hit.index_copy(0, index, group_hit.index_select(0, index))
            finished = finished | self.agree(hit)
        if uniform and self.rows_leave:
            return finished
        full = state.new_tokens[state.rows_long] >= self.max_new
        if self.rows_leave:
            return finished | full
        self.unfinished[state.rows_long] &= ~finished
        return full

    def all_done(self, unfinished_host) -> bool:
        """Rows stay without an EOS id; the call ends once no row is unfinished (``unfinished_host``)."""
        return not self.rows_leave and not bool(unfinished_host.any())

    def out_of_time(self) -> bool:
        return self.deadline is not None and bool(self.agree(time.perf_counter() > self.deadline))
