"""Thinking spans and thinking budgets inside speculative decoding.

A speculative step emits a run of tokens per row instead of one; three rules keep every row's thinking exactly
as in the plain loop (:mod:`effdecode.generation.thinking`):

- **Budget caps the drafts.** A thinking row that may still choose ``r`` thinking tokens drafts at most
  ``r - 1``, so its run (accepted drafts plus the target's token) never passes the budget.
- **Forced text rides as drafts.** A row out of budget feeds ``think_end_prefix + think_end`` as if they were
  drafts, and emits them whatever the target says: the target's cache sees exactly what plain decoding
  feeds it. A row whose cache (KV limit) or ``max_new_tokens`` has less room forces the rest next step.
- **Runs end at markers.** A run is cut right after a ``think_start``/``think_end`` it contains (the target's
  later tokens are decoded again next step), so a row's thinking state only changes at the end of a run,
  where the single-token rules of the plain loop apply.

Early exit probes need one token per step and stay in the plain loop.
"""

from __future__ import annotations

import torch

from effdecode.generation.markers import ends_with, first_marker_end
from effdecode.generation.thinking import OPEN_END, ThinkingController

_NO_CAP = 1 << 30


class SpeculativeThinking:
    """Budget caps, forced text and span tracking of one speculative call (state lives in ``controller``).

    Parameters
    ----------
    controller : ThinkingController
        Holds the per-slot spans, thinking flags, thought counts and forcing progress.
    """

    def __init__(self, controller: ThinkingController) -> None:
        if controller.plan.early_exit:
            raise ValueError("early exit needs one token per step: it does not run with speculative decoding")
        self.controller = controller
        self.forced_counts: torch.Tensor | None = None  # [B] forced tokens of the last step's rows

    def limits(
        self, rows: torch.Tensor, room: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's draft caps and forced tokens for ``rows`` (int64 ``[B]``).

        Parameters
        ----------
        rows : torch.Tensor
            int64 ``[B]`` slots of the step.
        room : torch.Tensor
            int64 ``[B]``: tokens each row may still emit this step (cache room, ``max_new_tokens``), >= 1.

        Returns
        -------
        draft_cap : torch.Tensor
            int32 ``[B]``: the most drafts a row may verify (0 for forced rows).
        forced : torch.Tensor
            int64 ``[B, F]``: the forced tokens of each row from its forcing progress on (F = forced text).
        forced_counts : torch.Tensor
            int64 ``[B]``: forced tokens each row emits this step (0 for rows not forced).
        """
        ctl = self.controller
        budget = ctl.plan.budget
        forcing = ctl.force_step[rows] >= 0
        if budget is not None:
            start = ctl.thinking[rows] & ~forcing & (ctl.thought[rows] >= budget)
            ctl.force_step[rows] = torch.where(start, 0, ctl.force_step[rows])
            forcing = forcing | start
        step = ctl.force_step[rows].clamp(min=0)
        length = ctl.forced_ids.shape[0]
        index = step[:, None] + torch.arange(length, device=rows.device)[None, :]
        forced = ctl.forced_ids[index.clamp(max=length - 1)]
        forced_counts = torch.where(forcing, torch.minimum(length - step, room), 0)
        cap = torch.full_like(step, _NO_CAP)
        if budget is not None:
            cap = torch.where(ctl.thinking[rows], budget - ctl.thought[rows] - 1, cap)
        cap = torch.where(forcing, 0, cap).clamp(min=0).to(torch.int32)
        self.forced_counts = forced_counts
        return cap, forced, forced_counts

    @staticmethod
    def overlay(
        drafts: torch.Tensor | None,
        draft_lens: torch.Tensor | None,
        forced: torch.Tensor,
        forced_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify drafts ``[B, K]`` and lengths ``[B]``; forced rows get their first ``count - 1`` tokens.

        The row feeds its last token and those, so the step's columns predict all ``count`` forced tokens.
        """
        forcing = forced_counts > 0
        fed = (forced_counts - 1).clamp(min=0)
        width = max(forced.shape[1], drafts.shape[1] if drafts is not None else 0)
        if drafts is None:
            drafts = forced.new_zeros(forced.shape[0], width)
            draft_lens = torch.zeros(forced.shape[0], dtype=torch.int32, device=forced.device)
        elif drafts.shape[1] < width:
            drafts = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], width - drafts.shape[1])], dim=1)
        padded = torch.cat([forced, forced.new_zeros(forced.shape[0], width - forced.shape[1])], dim=1)
        drafts = torch.where(forcing[:, None], padded, drafts)
        lens = torch.where(forcing, fed.to(draft_lens.dtype), draft_lens)
        return drafts, lens

    @staticmethod
    def apply_forced(
        emitted: torch.Tensor,
        num_emitted: torch.Tensor,
        finished: torch.Tensor,
        forced: torch.Tensor,
        forced_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forced rows emit their forced tokens, whatever the target chose: (emitted, counts, finished)."""
        forcing = forced_counts > 0
        width = emitted.shape[1]
        if forced.shape[1] < width:
            forced = torch.cat([forced, forced.new_zeros(forced.shape[0], width - forced.shape[1])], dim=1)
        emitted = torch.where(forcing[:, None], forced[:, :width], emitted)
        num_emitted = torch.where(forcing, forced_counts.to(num_emitted.dtype), num_emitted)
        return emitted, num_emitted, finished & ~forcing

    def cut_at_markers(
        self,
        sequences: torch.Tensor,
        rows: torch.Tensor,
        ends: torch.Tensor,
        emitted: torch.Tensor,
        num_emitted: torch.Tensor,
    ) -> torch.Tensor:
        """``num_emitted`` cut so that no run goes past a ``think_start``/``think_end`` it contains.

        ``ends`` int64 ``[B]``: each row's last column in ``sequences`` before the run.
        """
        ctl = self.controller
        cut = num_emitted.long()
        for marker in (ctl.end_ids, ctl.start_ids):
            if marker is not None:
                first = first_marker_end(sequences, rows, ends, emitted, num_emitted, marker)
                cut = torch.minimum(cut, first + 1)
        return cut.to(num_emitted.dtype)

    def after_run(
        self,
        sequences: torch.Tensor,
        rows: torch.Tensor,
        ends: torch.Tensor,
        new_tokens: torch.Tensor,
        num_emitted: torch.Tensor,
    ) -> None:
        """Count thinking tokens, advance forcing and track markers once each row's run is appended.

        ``ends`` int64 ``[B]``: each row's last column after the append; ``new_tokens`` counts after it;
        ``num_emitted`` ``[B]`` the tokens each row appended (after every cut).
        """
        ctl = self.controller
        emitted_count = num_emitted.long()
        forced_counts = self.forced_counts
        if forced_counts is None:
            forced_counts = torch.zeros_like(emitted_count)
        forced = torch.minimum(forced_counts, emitted_count)
        forcing = forced_counts > 0
        # Tokens the target chose inside the span count toward the budget (forced ones do not).
        ctl.thought[rows] += torch.where(ctl.thinking[rows] & ~forcing, emitted_count, 0)
        progressed = ctl.force_step[rows] + forced
        done = progressed >= ctl.forced_ids.shape[0]
        ctl.force_step[rows] = torch.where(forcing, torch.where(done, -1, progressed), ctl.force_step[rows])
        self.forced_counts = None
        # Runs end at markers, so a marker can only end at a run's last token.
        position_after = ctl.prompt_lens[rows] + new_tokens[rows]
        appended = emitted_count > 0
        closed = ctl.thinking[rows] & appended & ends_with(sequences, rows, ends, ctl.end_ids)
        ctl.thinking[rows] &= ~closed
        end = position_after - ctl.end_ids.shape[0]
        ctl.spans[rows, 1] = torch.where(closed, end, ctl.spans[rows, 1])
        if ctl.start_ids is not None:
            opened = ~ctl.thinking[rows] & appended & ends_with(sequences, rows, ends, ctl.start_ids)
            ctl.thinking[rows] |= opened
            start = torch.stack([position_after, torch.full_like(position_after, OPEN_END)], dim=1)
            ctl.spans[rows] = torch.where(opened[:, None], start, ctl.spans[rows])
