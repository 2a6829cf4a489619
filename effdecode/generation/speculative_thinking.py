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
  where the single-token rules of the plain loop apply. With early exit, runs of thinking rows are cut right
  after an early-exit trigger too, so a trigger can only end a run; it is detected there.
- **Probing rows draft nothing.** A row busy with a probe (armed, starting, answering, or feeding its trigger
  again) feeds what :meth:`ThinkingController.forward_inputs` gives it, right-aligned in the same verify
  forward as the drafting rows, and chooses from its last column through the controller's hooks, exactly as
  the plain loop does; its cache advances by what it fed, not by what it emitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from effdecode.generation.markers import ends_with, first_marker_end
from effdecode.generation.thinking import OPEN_END, StepEmission, ThinkingController

if TYPE_CHECKING:
    from effdecode.cache import SlotKVCache
    from effdecode.generation.logits import LogitsPipeline

_NO_CAP = 1 << 30


@dataclass
class ProbeRows:
    """The rows of one speculative step that are busy with a probe (they feed, they do not draft).

    Attributes
    ----------
    index : torch.Tensor
        int64 ``[P]``: their indices among the step's rows (``index_host`` the same on the host).
    q_lens : torch.Tensor
        int32 ``[P]``: tokens each feeds to the forward (``q_host`` the same on the host).
    emission : StepEmission or None
        What they emitted after the forward (set by :meth:`SpeculativeThinking.probe_choose`).
    decided_host : np.ndarray or None
        bool ``[P]``: the probes decided after the forward.
    """

    index: torch.Tensor
    index_host: np.ndarray
    q_lens: torch.Tensor | None = None
    q_host: np.ndarray | None = None
    emission: StepEmission | None = None
    decided_host: np.ndarray | None = None

    def free(self, num_rows: int) -> torch.Tensor:
        """bool ``[num_rows]``: the step's rows that are not busy (they draft and verify)."""
        free = torch.ones(num_rows, dtype=torch.bool, device=self.index.device)
        return free.index_fill(0, self.index, False)


class SpeculativeThinking:
    """Budget caps, forced text and span tracking of one speculative call (state lives in ``controller``).

    Parameters
    ----------
    controller : ThinkingController
        Holds the per-slot spans, thinking flags, thought counts and forcing progress.
    """

    def __init__(self, controller: ThinkingController) -> None:
        self.controller = controller
        self.forced_counts: torch.Tensor | None = None  # [B] forced tokens of the last step's rows

    def limits(
        self, rows: torch.Tensor, room: torch.Tensor, free: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's draft caps and forced tokens for ``rows`` (int64 ``[B]``).

        Parameters
        ----------
        rows : torch.Tensor
            int64 ``[B]`` slots of the step.
        room : torch.Tensor
            int64 ``[B]``: tokens each row may still emit this step (cache room, ``max_new_tokens``), >= 1.
        free : torch.Tensor, optional
            bool ``[B]``: rows not busy with a probe (None: all). Busy rows neither draft nor start forcing
            here: the controller's ``after_choose`` handles them after the forward, as in the plain loop.

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
        if free is not None:
            forcing &= free
        if budget is not None:
            start = ctl.thinking[rows] & ~forcing & (ctl.thought[rows] >= budget)
            if free is not None:
                start &= free
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
        cap = torch.where(forcing, 0, cap).clamp(min=0)
        if free is not None:
            cap = torch.where(free, cap, 0)
        cap = cap.to(torch.int32)
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
        free: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``num_emitted`` cut so that no run goes past a ``think_start``/``think_end`` it contains.

        With early exit, the runs of thinking rows that are not forced are also cut right after a trigger.
        ``ends`` int64 ``[B]``: each row's last column in ``sequences`` before the run; ``free`` bool ``[B]``
        (None: all): the rows whose runs come from verification (a probe's emission is never cut).
        """
        ctl = self.controller
        cut = num_emitted.long()
        for marker in (ctl.end_ids, ctl.start_ids):
            if marker is not None:
                first = first_marker_end(sequences, rows, ends, emitted, num_emitted, marker)
                cut = torch.minimum(cut, first + 1)
        if ctl.triggers:
            forced = self.forced_counts
            may_trigger = ctl.thinking[rows] & (forced == 0 if forced is not None else True)
            for trigger in ctl.triggers:
                first = first_marker_end(sequences, rows, ends, emitted, num_emitted, trigger)
                cut = torch.where(may_trigger, torch.minimum(cut, first + 1), cut)
        if free is not None:
            cut = torch.where(free, cut, num_emitted.long())
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

    # -- early exit ----------------------------------------------------------------------------------------

    def run_triggers(
        self,
        sequences: torch.Tensor,
        rows: torch.Tensor,
        ends: torch.Tensor,
        num_emitted: torch.Tensor,
    ) -> torch.Tensor:
        """int64 ``[B]``: the length of the longest trigger ending each row's run (0: none), after
        :meth:`after_run`; only thinking rows that are not forced and appended a run probe.

        Runs are cut after a trigger, so a trigger can only end at a run's last token (``ends[b]``).
        """
        ctl = self.controller
        eligible = ctl.thinking[rows] & (ctl.force_step[rows] < 0) & (num_emitted > 0)
        hit = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        for trigger in ctl.triggers:
            matched = ends_with(sequences, rows, ends, trigger)
            hit = torch.where(matched, torch.clamp(hit, min=trigger.shape[0]), hit)
        return torch.where(eligible, hit, 0)

    def busy_rows(self, rows_host: np.ndarray) -> ProbeRows | None:
        """The rows of ``rows_host`` that feed a probe's inputs in the next forward, or None."""
        ctl = self.controller
        if not ctl.plan.early_exit:
            return None
        busy = (
            ctl.armed[rows_host]
            | ctl.starting[rows_host]
            | (ctl.stage[rows_host] > 0)
            | ctl.refeed[rows_host]
        )
        if not busy.any():
            return None
        index_host = np.flatnonzero(busy)
        return ProbeRows(torch.as_tensor(index_host, device=ctl.device), index_host)

    def overlay_probes(
        self,
        probe: ProbeRows,
        last_tokens: torch.Tensor,
        drafts: torch.Tensor,
        draft_lens: torch.Tensor,
        rows: torch.Tensor,
        rows_host: np.ndarray,
        cache: SlotKVCache,
        sequences: torch.Tensor,
        ends: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Busy rows' forward inputs laid out as "last token + drafts" for the verify forward.

        A busy row feeding ``q`` tokens ``x_0 .. x_{q-1}`` (probe text, one answer token, its trigger again)
        gets ``last_tokens = x_0`` and drafts ``x_1 ..`` of length ``q - 1``, so :func:`_verify_inputs` lays
        them out right-aligned from the row's position on, as the plain loop does. Calls the controller's
        ``forward_inputs`` (replacing probes rewind the cache there).

        Parameters
        ----------
        probe : ProbeRows
            The busy rows; ``q_lens``/``q_host`` are set here.
        last_tokens : torch.Tensor
            int64 ``[B]``: each row's feed token (busy rows: ``StepEmission.feed``).
        drafts, draft_lens : torch.Tensor
            int64 ``[B, K]`` and int32 ``[B]`` verify drafts (busy rows: none).
        rows : torch.Tensor
            int64 ``[B]`` slots; ``rows_host`` the same on the host.
        cache : SlotKVCache
            The target cache.
        sequences : torch.Tensor
            int64 ``[slots, W]`` output buffer; ``ends`` int64 ``[B]`` each row's last column in it.

        Returns
        -------
        tuple of torch.Tensor
            ``last_tokens`` ``[B]``, ``drafts`` ``[B, max(K, T - 1)]``, ``draft_lens`` int32 ``[B]``.
        """
        index = probe.index
        ids, q_lens, q_host = self.controller.forward_inputs(
            last_tokens[index], rows[index], rows_host[probe.index_host], cache, sequences, ends[index]
        )
        probe.q_lens, probe.q_host = q_lens, q_host
        num_cols = ids.shape[1]
        # Right-aligned [P, T] -> left-aligned: column j holds the row's j-th fed token.
        source = (num_cols - q_lens.long())[:, None] + torch.arange(num_cols, device=ids.device)[None, :]
        left = ids.gather(1, source.clamp(max=num_cols - 1))
        if drafts.shape[1] < num_cols - 1:
            drafts = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], num_cols - 1 - drafts.shape[1])], 1)
        last_tokens = last_tokens.index_copy(0, index, left[:, 0])
        if num_cols > 1:
            rows_drafts = drafts[index].clone()
            rows_drafts[:, : num_cols - 1] = left[:, 1:]
            drafts = drafts.index_copy(0, index, rows_drafts)
        draft_lens = draft_lens.index_copy(0, index, (q_lens - 1).to(draft_lens.dtype))
        return last_tokens, drafts, draft_lens

    def probe_choose(
        self,
        probe: ProbeRows,
        logits: torch.Tensor,
        rows: torch.Tensor,
        rows_host: np.ndarray,
        new_tokens: torch.Tensor,
        cache: SlotKVCache,
        pipeline: LogitsPipeline,
    ) -> None:
        """After the forward: busy rows advance their caches by what they fed, then choose as the plain loop.

        ``logits`` ``[P, V]`` are the busy rows' last-column logits; ``rows`` int64 ``[B]`` the step's slots
        (``rows_host`` on the host); ``new_tokens`` int64 ``[slots]``. Sets ``probe.emission`` and
        ``probe.decided_host``.
        """
        ctl = self.controller
        slots = rows[probe.index]
        slots_host = rows_host[probe.index_host]
        cache.cache_lens.index_add_(0, slots, probe.q_lens)
        cache.positions.index_add_(0, slots, probe.q_lens.long())
        ctl.after_forward(logits, slots, slots_host)
        logits = ctl.before_choose(logits, slots, slots_host)
        scores = pipeline.process(logits, None, new_tokens[slots])
        chosen = pipeline.choose(scores, slots)
        probe.emission = ctl.after_choose(chosen, slots, slots_host, new_tokens[slots], cache)
        probe.decided_host = ctl.decided_host

    @staticmethod
    def merge_probes(
        probe: ProbeRows,
        emitted: torch.Tensor,
        num_emitted: torch.Tensor,
        finished: torch.Tensor,
        eos_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The step's runs ``[B, T]`` with the busy rows' emissions in place of their verify results.

        Returns ``(emitted [B, max(T, W)], num_emitted [B], finished [B], rewind int64 [B] or None)``; a busy
        row finishes when it emitted an EOS last.
        """
        emission = probe.emission
        index = probe.index
        tokens = emission.tokens
        width = max(emitted.shape[1], tokens.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)

        emitted = pad(emitted).index_copy(0, index, pad(tokens))
        counts = emission.counts
        num_emitted = num_emitted.index_copy(0, index, counts.to(num_emitted.dtype))
        last = tokens.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)
        done = (
            torch.isin(last, eos_ids) if eos_ids.numel() else torch.zeros_like(last, dtype=torch.bool)
        ) & (counts > 0)
        finished = finished.index_copy(0, index, done)
        rewind = None
        if emission.rewind is not None:
            rewind = torch.zeros_like(num_emitted, dtype=torch.long).index_copy(0, index, emission.rewind)
        return emitted, num_emitted, finished, rewind
