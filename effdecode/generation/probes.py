"""DEER early exit ("Dynamic Early Exit in Reasoning"): the probe half of the thinking controller.

When a thinking row generates a trigger (a thought boundary such as "Wait"), it *probes*. Its next forward
feeds the trigger as usual; the logits it gives (the row's real next-token distribution) are saved and nothing
is emitted. The forward after that feeds the probe text (which contains ``think_end``), then
``early_exit_answer_tokens - 1`` greedy answer tokens follow, one per forward. The probe's entries sit at the
end of the row's slot cache. If the answer tokens' confidence reaches the threshold, the probe text becomes
the row's own text (thinking ends; the answer tokens are dropped and the answer is decoded again with the
call's own sampling); otherwise the cache length rolls back to the trigger and the row goes on thinking from
the saved logits, exactly as if it had never probed. With ``early_exit_replace_trigger`` the probe takes the
trigger's place (the trigger is fed again if the probe is rolled back).

A row busy with a probe (armed, starting, answering, or feeding its trigger again) drafts nothing: it feeds
what :meth:`ProbeHooks.forward_inputs` gives it, right-aligned in the same forward as the other rows, and
chooses from its last column through :meth:`ProbeHooks.probe_choose`; its cache advances by what it fed, not
by what it emitted. Probing rows share the batched forwards of the other rows; the cache is never copied.
Host state (which rows probe) comes from the step's one sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from effdecode.generation.markers import OPEN_END, ends_with

if TYPE_CHECKING:
    from effdecode.cache import SlotKVCache
    from effdecode.generation.logits import LogitsPipeline


@dataclass
class StepEmission:
    """What the rows of one step emit.

    Attributes
    ----------
    tokens : torch.Tensor
        int64 ``[B, W]``: each row's emitted tokens, left-aligned.
    counts : torch.Tensor
        int64 ``[B]``: tokens emitted (0 for a row in the middle of a probe).
    feed : torch.Tensor
        int64 ``[B]``: the token each row feeds to the next forward.
    rewind : torch.Tensor or None
        int64 ``[B]``: tokens taken back from the row's end before ``tokens`` are written (a confident probe
        that replaces its trigger); None for none.
    """

    tokens: torch.Tensor
    counts: torch.Tensor
    feed: torch.Tensor
    rewind: torch.Tensor | None = None


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
        What they emitted after the forward (set by :meth:`ProbeHooks.probe_choose`).
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


class ProbeHooks:
    """DEER methods of :class:`effdecode.generation.thinking.ThinkingController` (its state lives there)."""

    @property
    def probe_width(self) -> int:
        """Query columns of the forward that feeds the probe text."""
        return int(self.probe_ids.shape[0]) if self.probe_ids is not None else 0

    def probing(self, rows: np.ndarray) -> bool:
        return bool(self.stage[rows].any()) if self.plan.early_exit else False

    def before_choose(self, logits: torch.Tensor, rows: torch.Tensor, rows_host: np.ndarray) -> torch.Tensor:
        """Record probing rows' answer tokens; give deciding rows the logits of their real next token.

        ``logits`` ``[B, V]`` are the step's raw logits of ``rows`` (int64, host copy ``rows_host``).
        """
        stage = self.stage[rows_host]
        if not self.plan.early_exit:
            return logits
        starting_host = self.starting[rows_host]
        if starting_host.any():
            starting = torch.as_tensor(starting_host, device=self.device)
            self.real_logits[rows] = torch.where(starting[:, None], logits.float(), self.real_logits[rows])
        if not stage.any():
            return logits
        plan = self.plan
        probing = torch.as_tensor(stage > 0, device=self.device)
        deciding = torch.as_tensor(stage == plan.answer_tokens, device=self.device)
        probabilities = logits.float().softmax(dim=-1)
        top, answer = probabilities.max(dim=-1)
        gained = top.clamp_min(1e-30).log() if plan.geometric else top
        self.confidence[rows] += torch.where(probing, gained, 0.0)
        self.answer_token[rows] = torch.where(probing, answer, self.answer_token[rows])
        mean = self.confidence[rows] / plan.answer_tokens
        score = mean.exp() if plan.geometric else mean
        confident = deciding & (score >= plan.threshold)
        self.confident[rows] = confident
        saved = torch.where(confident[:, None], self.answer_logits[rows], self.real_logits[rows])
        return torch.where(deciding[:, None], saved.to(logits.dtype), logits)

    def _force_after_choose(self, chosen, rows, stage, probing) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token, forcing)`` ``[B]``: chosen tokens, forced text where the budget ran out."""
        plan = self.plan
        # Budget: rows that chose their budget's worth of thinking tokens are forced from now on.
        forcing = self.force_step[rows] >= 0
        if plan.budget is not None:
            start = self.thinking[rows] & ~forcing & (self.thought[rows] >= plan.budget)
            if probing is not None:
                # No forcing mid-probe; but an appended probe rolled back at the budget emits the forced
                # text instead of its row's real next token (a replaced one refeeds its trigger first).
                rolled_back = (
                    torch.as_tensor(stage == plan.answer_tokens, device=self.device) & ~self.confident[rows]
                )
                start &= ~probing | (rolled_back & (not plan.replace_trigger))
            self.force_step[rows] = torch.where(start, 0, self.force_step[rows])
            forcing = forcing | start
        step = self.force_step[rows]
        forced = self.forced_ids[step.clamp(0, self.forced_ids.shape[0] - 1)]
        token = torch.where(forcing, forced, chosen)
        advanced = torch.where(forcing, step + 1, step)
        self.force_step[rows] = torch.where(advanced >= self.forced_ids.shape[0], -1, advanced)
        return token, forcing

    def after_choose(
        self,
        chosen: torch.Tensor,
        rows: torch.Tensor,
        rows_host: np.ndarray,
        new_tokens: torch.Tensor,
        cache,
    ) -> StepEmission:
        """Apply forcing and probe outcomes to the chosen tokens ``[B]``; roll back deciding rows' caches."""
        plan = self.plan
        device = self.device
        stage = self.stage[rows_host]
        busy = (stage > 0) | self.starting[rows_host] if plan.early_exit else stage > 0
        probing = torch.as_tensor(busy, device=device) if busy.any() else None
        token, forcing = self._force_after_choose(chosen, rows, stage, probing)
        # Tokens the model chose inside the span count toward the budget.
        counted = self.thinking[rows] & ~forcing
        self.decided_host = np.zeros(len(rows_host), dtype=bool)
        if probing is None:
            self.thought[rows] += counted.long()
            return StepEmission(token[:, None], torch.ones_like(token), token)

        deciding_host = stage == plan.answer_tokens
        self.decided_host = deciding_host
        deciding = torch.as_tensor(deciding_host, device=device)
        confident = self.confident[rows] & deciding
        in_probe = probing & ~deciding
        # A confident probe ends thinking (its answer token is not a thinking token); a replacing probe
        # rolled back emits nothing (its trigger is fed again).
        thought_gain = counted & ~in_probe & ~confident
        if plan.replace_trigger:
            thought_gain &= ~deciding
        self.thought[rows] += thought_gain.long()
        # Deciding rows: keep the probe text when confident, else nothing of the probe.
        width = self.probe_width
        kept = self.base_len[rows] + torch.where(confident, width, 0).to(torch.int32)
        cache.cache_lens[rows] = torch.where(deciding, kept, cache.cache_lens[rows])
        position = self.base_position[rows] + torch.where(confident, width, 0)
        cache.positions[rows] = torch.where(deciding, position, cache.positions[rows])
        # Emission: probe text then the chosen token for confident rows; nothing while probing.
        tokens = torch.cat([self.probe_ids[None, :].expand(rows.shape[0], -1), token[:, None]], dim=1)
        tokens = torch.where(confident[:, None], tokens, torch.cat([token[:, None], tokens[:, 1:]], dim=1))
        counts = torch.where(confident, width + 1, 1)
        counts = torch.where(in_probe, 0, counts)
        feed = torch.where(in_probe, self.answer_token[rows], token)
        rewind = None
        if plan.replace_trigger:
            # The probe took the trigger's place: a confident one replaces it in the text; a rolled-back one
            # emits nothing now and feeds the trigger again (see forward_inputs).
            trigger = torch.where(deciding, self.trigger_len[rows], 0)
            rewind = torch.where(confident, trigger, 0)
            counts = torch.where(deciding & ~confident, 0, counts)
            self.thought[rows] -= rewind
        else:
            trigger = torch.zeros_like(counts)
        # A confident probe closes the span at the probe's think_end.
        end_position = (
            self.prompt_lens[rows] + new_tokens - trigger + plan.probe_end_at - self.end_ids.shape[0]
        )
        self._close(rows, confident, end_position)
        self.early_exits[rows] += confident.long()
        self.confidence[rows] = torch.where(deciding, 0.0, self.confidence[rows])
        self.stage[rows_host[deciding_host]] = 0
        return StepEmission(tokens, counts.long(), feed, rewind)

    def after_append(
        self, sequences: torch.Tensor, rows: torch.Tensor, rows_host: np.ndarray, ends: torch.Tensor,
        new_tokens: torch.Tensor, emission: StepEmission,
    ) -> torch.Tensor:  # fmt: skip
        """Track span markers after the step's tokens were appended; int64 ``[B]``: the length of the trigger
        each row just generated (0: none; such rows should probe).

        ``ends`` int64 ``[B]`` is each row's last column in ``sequences``; ``new_tokens`` counts after the
        append.
        """
        single = emission.counts == 1
        position_after = self.prompt_lens[rows] + new_tokens  # position of the next token
        closed = self.thinking[rows] & single & ends_with(sequences, rows, ends, self.end_ids)
        self._close(rows, closed, position_after - self.end_ids.shape[0])
        if self.start_ids is not None:
            opened = ~self.thinking[rows] & single & ends_with(sequences, rows, ends, self.start_ids)
            self.thinking[rows] |= opened
            start = torch.stack([position_after, torch.full_like(position_after, OPEN_END)], dim=1)
            self.spans[rows] = torch.where(opened[:, None], start, self.spans[rows])
        if not self.plan.early_exit:
            return torch.zeros_like(emission.counts)
        eligible = self.thinking[rows] & single & (self.force_step[rows] < 0)
        if self.stage[rows_host].any():  # (skip the host-to-device copy on the usual step without probes)
            eligible &= torch.as_tensor(self.stage[rows_host] == 0, device=self.device)
        hit = torch.zeros_like(emission.counts)
        for trigger in self.triggers:  # the longest trigger that matches
            matched = ends_with(sequences, rows, ends, trigger)
            hit = torch.where(matched, torch.clamp(hit, min=trigger.shape[0]), hit)
        return torch.where(eligible, hit, 0)

    def probes_decided(self, slots: np.ndarray, confident_host: np.ndarray) -> None:
        """After the sync: rolled-back probes that replaced their trigger feed it again next forward."""
        if self.plan.replace_trigger:
            self.refeed[slots[~confident_host.astype(bool)]] = True

    def start_probes(self, rows_host: np.ndarray, trigger_lens_host: np.ndarray) -> None:
        """Rows that generated a trigger (its length in tokens, 0 for none; from the step's sync) probe.

        Appending, the row first feeds its trigger (armed); replacing, the probe starts with the next forward.
        """
        if not self.plan.early_exit:
            return
        triggered = trigger_lens_host > 0
        self.probes += int(triggered.sum())
        if self.plan.replace_trigger:
            self.starting[rows_host[triggered]] = True
            self.trigger_len_host[rows_host[triggered]] = trigger_lens_host[triggered]
        else:
            self.armed[rows_host[triggered]] = True

    def cache_rewind(self, rows_host: np.ndarray) -> np.ndarray:
        """Entries a starting probe takes back from each row's cache (the trigger's tokens already in it)."""
        if not self.plan.replace_trigger:
            return np.zeros(len(rows_host), dtype=np.int64)
        return np.where(self.starting[rows_host], self.trigger_len_host[rows_host] - 1, 0)

    def forward_inputs(
        self,
        feed: torch.Tensor,
        rows: torch.Tensor,
        rows_host: np.ndarray,
        cache,
        sequences: torch.Tensor,
        ends: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(input_ids [B, T], q_lens int32 [B], q_lens on the host)`` of the next forward.

        Rows starting a probe feed the probe text (replacing: from the trigger's first entry on), rows whose
        replaced trigger was rolled back feed their trigger again (its last tokens in ``sequences``, ending at
        column ``ends[b]``), the others one token; all right-aligned.
        """
        ones = np.ones(len(rows_host), dtype=np.int64)
        if not self.plan.early_exit:
            return feed[:, None], torch.ones(rows.shape[0], dtype=torch.int32, device=self.device), ones
        starting_host = self.starting[rows_host]
        refeed_host = self.refeed[rows_host]
        if not (starting_host.any() or refeed_host.any()):
            return feed[:, None], torch.ones(rows.shape[0], dtype=torch.int32, device=self.device), ones
        width = self.probe_width
        lens_host = np.where(starting_host, width, np.where(refeed_host, self.trigger_len_host[rows_host], 1))
        num_cols = int(lens_host.max())
        starting = torch.as_tensor(starting_host, device=self.device)
        if self.plan.replace_trigger:
            rewind = torch.as_tensor(self.cache_rewind(rows_host), device=self.device)
            self.trigger_len[rows] = torch.as_tensor(self.trigger_len_host[rows_host], device=self.device)
            cache.cache_lens[rows] -= rewind.to(torch.int32)
            cache.positions[rows] -= rewind
        self.base_len[rows] = torch.where(starting, cache.cache_lens[rows], self.base_len[rows])
        self.base_position[rows] = torch.where(starting, cache.positions[rows], self.base_position[rows])
        # Each row's feed, right-aligned in num_cols columns: the tail of its sequence (refeed), else feed.
        columns = torch.arange(num_cols, device=self.device)
        tail = sequences[rows[:, None], (ends[:, None] - (num_cols - 1) + columns[None, :]).clamp(min=0)]
        input_ids = torch.where(torch.as_tensor(refeed_host, device=self.device)[:, None], tail, 0)
        input_ids[:, -1] = torch.where(
            torch.as_tensor(refeed_host, device=self.device), input_ids[:, -1], feed
        )
        if starting_host.any():  # then num_cols >= width
            probe = self.probe_ids[None, :].expand(rows.shape[0], -1)
            last = input_ids[:, num_cols - width :]
            input_ids[:, num_cols - width :] = torch.where(starting[:, None], probe, last)
        q_lens = torch.as_tensor(lens_host, device=self.device).to(torch.int32)
        return input_ids, q_lens, lens_host

    def after_forward(self, logits: torch.Tensor, rows: torch.Tensor, rows_host: np.ndarray) -> None:
        """Advance probe states after a forward whose last-column logits are ``logits`` ``[B, V]``."""
        if not self.plan.early_exit:
            return
        starting_host = self.starting[rows_host]
        if starting_host.any():
            starting = torch.as_tensor(starting_host, device=self.device)
            self.answer_logits[rows] = torch.where(
                starting[:, None], logits.float(), self.answer_logits[rows]
            )
        self.stage[rows_host] += (self.stage[rows_host] > 0) | starting_host
        self.starting[rows_host] = self.armed[rows_host]
        self.armed[rows_host] = False
        self.refeed[rows_host] = False

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
        ctl = self
        eligible = ctl.thinking[rows] & (ctl.force_step[rows] < 0) & (num_emitted > 0)
        hit = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        for trigger in ctl.triggers:
            matched = ends_with(sequences, rows, ends, trigger)
            hit = torch.where(matched, torch.clamp(hit, min=trigger.shape[0]), hit)
        return torch.where(eligible, hit, 0)

    def busy_rows(self, rows_host: np.ndarray) -> ProbeRows | None:
        """The rows of ``rows_host`` that feed a probe's inputs in the next forward, or None."""
        ctl = self
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
        ids, q_lens, q_host = self.forward_inputs(
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
        history: torch.Tensor | None = None,
    ) -> None:
        """After the forward: busy rows advance their caches by what they fed, then choose as the plain loop.

        ``logits`` ``[P, V]`` are the busy rows' last-column logits; ``rows`` int64 ``[B]`` the step's slots
        (``rows_host`` on the host); ``new_tokens`` int64 ``[slots]``. Sets ``probe.emission`` and
        ``probe.decided_host``.
        """
        ctl = self
        slots = rows[probe.index]
        slots_host = rows_host[probe.index_host]
        cache.cache_lens.index_add_(0, slots, probe.q_lens)
        cache.positions.index_add_(0, slots, probe.q_lens.long())
        ctl.after_forward(logits, slots, slots_host)
        logits = ctl.before_choose(logits, slots, slots_host)
        if history is not None:  # [B, L] of the step's rows (history-dependent processors)
            history = history[probe.index]
        scores = pipeline.process(logits, history, new_tokens[slots], rows=slots)
        chosen = pipeline.choose(scores, slots)
        probe.emission = ctl.after_choose(chosen, slots, slots_host, new_tokens[slots], cache)
        probe.decided_host = ctl.decided_host

    @staticmethod
    def merge_probes(
        probe: ProbeRows, emitted: torch.Tensor, num_emitted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The step's runs ``[B, T]`` with the busy rows' emissions in place of their own.

        Returns ``(emitted [B, max(T, W)], num_emitted [B], rewind int64 [B] or None)``.
        """
        emission = probe.emission
        index = probe.index
        tokens = emission.tokens
        width = max(emitted.shape[1], tokens.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)

        emitted = pad(emitted).index_copy(0, index, pad(tokens))
        num_emitted = num_emitted.index_copy(0, index, emission.counts.to(num_emitted.dtype))
        rewind = None
        if emission.rewind is not None:
            rewind = torch.zeros_like(num_emitted, dtype=torch.long).index_copy(0, index, emission.rewind)
        return emitted, num_emitted, rewind
