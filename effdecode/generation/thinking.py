"""Thinking control: one controller for thinking spans, thinking budgets and DEER early exit.

Every row has a thinking span in RoPE positions ``[start, end)`` (the tokens between ``think_start`` and
``think_end``, markers excluded; ``end`` is huge while the span is open). A row thinks from its open
``think_start`` in the prompt (or generated later), or from its first new token when ``think_start`` is None.

A step emits a run of tokens per row (one in plain decoding, accepted drafts plus one under speculation);
these rules keep every row's thinking the same whatever the run lengths:

- **Budget caps the drafts.** A thinking row that may still choose ``r`` thinking tokens drafts at most
  ``r - 1``, so its run never passes the budget.
- **Forced text rides as drafts.** A row out of budget feeds ``think_end_prefix + think_end`` as if they were
  drafts and emits them whatever the target says, so the target's cache sees exactly the forced text. A row
  whose cache (KV limit) or ``max_new_tokens`` has less room forces the rest next step.
- **Runs end at markers.** A run is cut right after a ``think_start``/``think_end`` it contains (and, with
  early exit, after a trigger), so a row's thinking state only changes at the end of a run.

Early exit (DEER probes) is in :mod:`effdecode.generation.probes`. All state is per slot on the device; the
host knows which rows probe (from the step's one sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from effdecode.config import DecodeConfig
from effdecode.generation.markers import (
    OPEN_END,
    ends_with,
    first_marker_end,
    last_occurrence,
    resolve_marker,
)
from effdecode.generation.probes import ProbeHooks


@dataclass(frozen=True)
class ThinkingPlan:
    """Resolved token ids of the thinking options of one call."""

    start_ids: list[int] | None
    end_ids: list[int]
    forced_ids: list[int]  # think_end_prefix + think_end, forced when the budget runs out
    budget: int | None
    triggers: list[list[int]]
    probe_ids: list[int]
    probe_end_at: int  # index in probe_ids just past think_end
    answer_tokens: int
    threshold: float
    geometric: bool
    replace_trigger: bool = False

    @property
    def early_exit(self) -> bool:
        return bool(self.triggers)


def thinking_plan(config: DecodeConfig, tokenizer) -> ThinkingPlan | None:
    """The call's :class:`ThinkingPlan`, or None when no option needs thinking spans.

    Raises
    ------
    ValueError
        Text markers without a tokenizer, empty markers, a probe without ``think_end``.
    """
    if config.thinking_budget is None and config.early_exit is None and not config.kv_think_only:
        return None
    start_ids = resolve_marker(config.think_start, tokenizer, "think_start")
    end_ids = resolve_marker(config.think_end, tokenizer, "think_end")
    if end_ids is None:
        raise ValueError("DecodeConfig.think_end is required to track thinking spans")
    prefix = resolve_marker(config.think_end_prefix, tokenizer, "think_end_prefix") or []
    triggers: list[list[int]] = []
    probe_ids: list[int] = []
    probe_end_at = 0
    if config.early_exit is not None:
        triggers = [resolve_marker(t, tokenizer, "early_exit_triggers") for t in config.early_exit_triggers]
        probe_ids = resolve_marker(config.early_exit_probe, tokenizer, "early_exit_probe")
        probe_end_at = last_occurrence(probe_ids, end_ids)
        if probe_end_at < 0:
            raise ValueError(
                f"DecodeConfig.early_exit_probe={config.early_exit_probe!r} does not contain think_end="
                f"{config.think_end!r}; a confident probe must close the thinking span"
            )
    return ThinkingPlan(
        start_ids=start_ids,
        end_ids=end_ids,
        forced_ids=prefix + end_ids,
        budget=config.thinking_budget,
        triggers=triggers,
        probe_ids=probe_ids,
        probe_end_at=probe_end_at,
        answer_tokens=config.early_exit_answer_tokens,
        threshold=config.early_exit_threshold,
        geometric=config.early_exit_confidence == "geometric",
        replace_trigger=config.early_exit_replace_trigger,
    )


NO_CAP = 1 << 30


class ThinkingController(ProbeHooks):
    """Per-slot thinking state of one call (see the module docstring); the DEER hooks come from ProbeHooks.

    Parameters
    ----------
    plan : ThinkingPlan
    slots : int
        Rows the state is kept for (:meth:`admit` fills them from their prompts).
    device : torch.device
    vocab_size : int
        For the saved logits of probing rows.
    """

    def __init__(self, plan: ThinkingPlan, slots: int, device: torch.device, vocab_size: int) -> None:
        self.plan = plan
        self.device = device
        self.prompt_lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.spans = torch.zeros(slots, 2, dtype=torch.long, device=device)
        self.thinking = torch.zeros(slots, dtype=torch.bool, device=device)
        self.thought = torch.zeros(slots, dtype=torch.long, device=device)
        self.force_step = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.early_exits = torch.zeros(slots, dtype=torch.long, device=device)
        self.probes = 0
        self.confident = torch.zeros(slots, dtype=torch.bool, device=device)  # last decided probe's outcome
        as_ids = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)
        self.end_ids = as_ids(plan.end_ids)
        self.start_ids = as_ids(plan.start_ids) if plan.start_ids is not None else None
        self.forced_ids = as_ids(plan.forced_ids)
        self.triggers = [as_ids(t) for t in plan.triggers]
        self.probe_ids = as_ids(plan.probe_ids) if plan.early_exit else None
        # Host-side probe state: armed (trigger generated) -> starting (real logits saved, probe text fed by
        # the next forward) -> stage s >= 1 (s probe forwards done) -> decided at stage answer_tokens.
        self.stage = np.zeros(slots, dtype=np.int64)
        self.armed = np.zeros(slots, dtype=bool)
        self.starting = np.zeros(slots, dtype=bool)
        # Replace mode: trigger length per probing slot, and rows that feed their trigger again after a
        # rolled-back probe (its entries were overwritten by the probe).
        self.trigger_len_host = np.zeros(slots, dtype=np.int64)
        self.refeed = np.zeros(slots, dtype=bool)
        self.decided_host = np.zeros(0, dtype=bool)  # over the last step's rows: probes decided in it
        self.base_host = np.zeros(slots, dtype=np.int64)  # host copy of base_len, kept by the engine
        if plan.early_exit:
            self.base_len = torch.zeros(slots, dtype=torch.int32, device=device)
            self.base_position = torch.zeros(slots, dtype=torch.long, device=device)
            self.real_logits = torch.zeros(slots, vocab_size, dtype=torch.float32, device=device)
            self.answer_logits = torch.zeros(slots, vocab_size, dtype=torch.float32, device=device)
            self.confidence = torch.zeros(slots, dtype=torch.float32, device=device)
            self.answer_token = torch.zeros(slots, dtype=torch.long, device=device)
            self.trigger_len = torch.zeros(slots, dtype=torch.long, device=device)

        self.forced_counts: torch.Tensor | None = None  # [B] forced tokens of the current step's rows

    def admit(
        self, slots: torch.Tensor, slots_host: np.ndarray, input_ids: torch.Tensor, prompt_lens
    ) -> None:
        """Fresh state for the rows now in ``slots`` (int64 ``[A]``, host copy): spans from their prompts
        (``input_ids`` ``[A, T0]`` left-padded, ``prompt_lens`` ``[A]``)."""
        plan = self.plan
        count, width = input_ids.shape
        spans = torch.zeros(count, 2, dtype=torch.long)
        thinking = torch.zeros(count, dtype=torch.bool)
        lens = prompt_lens.tolist()
        for row, prompt in enumerate(input_ids.tolist()):
            tokens = prompt[width - lens[row] :]
            if plan.start_ids is None:
                spans[row] = torch.tensor([lens[row], OPEN_END])
                thinking[row] = True
                continue
            opened = last_occurrence(tokens, plan.start_ids)
            closed = last_occurrence(tokens, plan.end_ids)
            if opened >= 0 and opened > closed:
                spans[row] = torch.tensor([opened, OPEN_END])
                thinking[row] = True
            elif opened >= 0:
                spans[row] = torch.tensor([opened, closed - len(plan.end_ids)])
        self.prompt_lens[slots] = prompt_lens.to(self.device).long()
        self.spans[slots] = spans.to(self.device)
        self.thinking[slots] = thinking.to(self.device)
        self.thought[slots] = 0
        self.force_step[slots] = -1
        self.early_exits[slots] = 0
        self.confident[slots] = False
        for host in (self.stage, self.trigger_len_host, self.base_host):
            host[slots_host] = 0
        for host in (self.armed, self.starting, self.refeed):
            host[slots_host] = False
        if plan.early_exit:
            self.confidence[slots] = 0.0

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
        ctl = self
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
        cap = torch.full_like(step, NO_CAP)
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
        emitted: torch.Tensor, counts: torch.Tensor, forced: torch.Tensor, forced_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forced rows emit their forced tokens, whatever the target chose: ``(emitted, counts)``."""
        forcing = forced_counts > 0
        width = emitted.shape[1]
        if forced.shape[1] < width:
            forced = torch.cat([forced, forced.new_zeros(forced.shape[0], width - forced.shape[1])], dim=1)
        emitted = torch.where(forcing[:, None], forced[:, :width], emitted)
        return emitted, torch.where(forcing, forced_counts.to(counts.dtype), counts)

    def forcing_next(self, rows: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: rows of ``rows`` (int64) that force text in their next step (host hint: the step is
        then planned wider than one token)."""
        forcing = self.force_step[rows] >= 0
        if self.plan.budget is not None:
            forcing |= self.thinking[rows] & (self.thought[rows] >= self.plan.budget)
        return forcing

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
        ctl = self
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
        ctl = self
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

    def _close(self, rows: torch.Tensor, closing: torch.Tensor, end_position: torch.Tensor) -> None:
        self.thinking[rows] &= ~closing
        self.spans[rows, 1] = torch.where(closing, end_position, self.spans[rows, 1])

    def thinking_tokens(self) -> list[int]:
        return self.thought.tolist()
