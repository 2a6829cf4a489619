"""The drafter participant: which rows draft how many tokens this step, and what they propose.

Wraps a :class:`DraftSchedule`, a :class:`DraftGate` and a drafter (:class:`NgramDrafter` or
:class:`ModelDrafter`). Rows whose drafts keep failing pause (the schedule); while every row is paused, or
while drafting does not pay for the batch (the gate, measured), steps skip the proposal entirely: such a step
is a plain step (one token per row, no host copy for the schedule).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from effdecode.generation.drafters import (
    DraftGate,
    DraftSchedule,
    ModelDrafter,
    NgramDrafter,
    propose_for_some,
)
from effdecode.generation.request import GenerationRequest
from effdecode.generation.state import DecodeState
from effdecode.hf_attention import routed_through_effdecode
from effdecode.ops.sampling import warp_logits


class Drafting:
    """Draft proposals and their statistics for one call.

    Parameters
    ----------
    request : GenerationRequest
        With ``speculation`` set.
    capacity : int
        Entries per slot of the target cache (the draft model's cache gets as many).
    slots : int, optional
        Slots of the call (default: the batch size).
    """

    def __init__(
        self, request: GenerationRequest, capacity: int, timed_gate: bool = True, slots: int | None = None
    ) -> None:
        plan = request.speculation
        config = request.decode_config
        device = request.input_ids.device
        batch_size = slots if slots is not None else request.input_ids.shape[0]
        self.plan = plan
        self.request = request
        self.schedule = DraftSchedule(plan, batch_size, device)
        if plan.assistant_model is not None:
            # The draft cache obeys the target's KV budget too, with streaming eviction whatever the
            # target's policy: drafts never change the output, so the cheapest policy will do (no scores).
            eviction = None
            if config.compresses:
                eviction = dataclasses.replace(config, kv_policy="streaming", kv_think_only=False)
            self.drafter = ModelDrafter(
                plan.assistant_model, batch_size, capacity, config.attn_backend, eviction,
                torch.zeros(batch_size, dtype=torch.int32, device=device),
            )  # fmt: skip
        else:
            self.drafter = NgramDrafter(plan, config.attn_backend)
        self.proposed = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.accepted = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.quiet_until = 0  # no row drafts before this schedule step
        # The gate decides from wall-clock timings. Greedy output never depends on it, but sampled output
        # does (which steps verify drafts changes the random draws), and tensor-parallel ranks would time
        # differently and run different forwards: there it stays open, so a fixed seed reproduces the output
        # and every rank takes the same steps. Rows whose drafts keep failing still pause (DraftSchedule).
        self.gate = DraftGate() if timed_gate else None
        self.drafted = False  # the current step verifies drafts

    @property
    def nbytes(self) -> int:
        return self.drafter.nbytes

    @property
    def forwards(self) -> int:
        return self.drafter.forwards

    def routing(self):
        """The draft model's attention goes through effdecode for the call."""
        draft = self.plan.assistant_model
        return routed_through_effdecode(draft) if draft is not None else contextlib.nullcontext()

    def prefill(self, admission, groups=None) -> None:
        """The rows of ``admission`` (a :class:`~effdecode.generation.state.Admission`) start drafting afresh:
        schedule, statistics and (draft model) their slots of the draft cache, prefilled together (rows of one
        prompt once: ``groups`` from :func:`~effdecode.generation.shared_prefill.sharing_groups`)."""
        slots = admission.slots_dev
        self.schedule.admit(slots)
        self.proposed[slots] = 0
        self.accepted[slots] = 0
        self.quiet_until = 0
        self.drafter.prefill(admission, groups)

    def rollback(self, state: DecodeState, kept_lens: torch.Tensor) -> None:
        """The draft cache keeps the first ``kept_lens`` (``[R]``) tokens of each active row's history."""
        self.drafter.rollback(state.rows_long, kept_lens)

    def propose(
        self, state: DecodeState, cap: torch.Tensor | None, kv_bound: int, all_may_pause: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(drafts [R, K], lengths int32 [R], draft distributions [R, K, V] or None)``, or Nones.

        ``cap`` int ``[R]`` (or None): the most drafts each row may verify (budget, KV limit). A row never
        drafts more than it may still emit minus the target's own token. While every row is paused (and
        ``all_may_pause``: no other cap decides), the steps before the next probe skip the proposal.
        """
        schedule = self.schedule
        self.drafted = False
        if schedule.steps + 1 < self.quiet_until or (self.gate is not None and not self.gate.open):
            schedule.steps += 1
            return None, None, None
        rows = state.rows_long
        room = (state.max_new - state.new_tokens[rows]).to(torch.int32)  # >= 1 for an active row
        wanted = torch.minimum(schedule.wanted(rows), room - 1)
        if cap is not None:
            wanted = torch.minimum(wanted, cap).clamp(min=0)
        wanted_host = wanted.cpu().numpy()  # the proposal's one sync
        max_draft = int(wanted_host.max())
        if max_draft == 0:
            if all_may_pause:  # (not a pause: a limit)
                self.quiet_until = schedule.next_probe(rows)
            return None, None, None
        self.drafted = True
        history, history_lens = state.history, state.history_lens
        choose = self._choose
        if isinstance(self.drafter, ModelDrafter) and not wanted_host.all():
            # Only drafting rows run the draft model; paused rows catch up when they draft again.
            return propose_for_some(
                self.drafter, state.rows, np.flatnonzero(wanted_host), max_draft, wanted, history,
                history_lens, kv_bound + 2, choose, state.slot_span,
            )  # fmt: skip
        return self.drafter.propose(
            state.rows, max_draft, wanted, history, history_lens, kv_bound + 2, choose, state.slot_span
        )

    def after_sync(self, tokens: int, rows: int) -> None:
        """The step's ``tokens`` over ``rows`` rows are known on the host: time it for the gate."""
        if self.gate is not None:
            self.gate.record(self.drafted, tokens, rows)

    def _choose(self, logits: torch.Tensor):
        if not self.request.do_sample:
            return logits.argmax(dim=-1), None
        distribution = warp_logits(logits.float(), self.request.sampling).softmax(dim=-1)
        return torch.multinomial(distribution, 1).squeeze(1), distribution

    def after_accept(
        self, state: DecodeState, emitted: torch.Tensor, counts: torch.Tensor, drafts, draft_lens
    ) -> None:
        """Count the accepted drafts (the leading emitted tokens that are the row's own) and adjust the
        schedule."""
        rows = state.rows_long
        k = min(drafts.shape[1], emitted.shape[1])
        positions = torch.arange(k, device=drafts.device)[None, :]
        in_run = (positions < draft_lens[:, None]) & (positions < counts[:, None])
        same = (emitted[:, :k] == drafts[:, :k]) & in_run
        accepted = same.long().cumprod(dim=1).sum(dim=1)
        self.proposed[rows] += draft_lens.long()
        self.accepted[rows] += accepted
        self.schedule.update(rows, draft_lens, accepted.to(torch.int32))
