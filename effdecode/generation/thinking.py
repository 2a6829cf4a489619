"""Thinking spans in the plain decode loop: tracking them, thinking budgets and DEER early exit.

Every row has a thinking span in RoPE positions ``[start, end)`` (the tokens between ``think_start`` and
``think_end``, markers excluded; ``end`` is huge while the span is open). A row thinks from its open
``think_start`` in the prompt (or generated later), or from its first new token when ``think_start`` is None.

Thinking budget: once a row has chosen ``thinking_budget`` thinking tokens, the next ones are forced:
``think_end_prefix`` then ``think_end``; the row then writes its answer.

Early exit ("deer", after DEER: Dynamic Early Exit in Reasoning): when a thinking row generates a trigger (a
thought boundary such as "Wait"), it *probes*. Its next forward feeds the trigger as usual; the logits it
gives (the row's real next-token distribution) are saved and nothing is emitted. The forward after that feeds
the probe text (which contains ``think_end``), then ``early_exit_answer_tokens - 1`` greedy answer tokens
follow, one per forward. The probe's entries sit at the end of the row's slot cache. If the answer tokens'
confidence reaches the threshold, the probe text becomes the row's own text (thinking ends; the answer tokens
are dropped and the answer is decoded again with the call's own sampling); otherwise the cache length rolls
back to the trigger and the row goes on thinking from the saved logits, exactly as if it had never probed.
Probing rows share the batched forwards of the other rows; the cache is never copied.

All state is per slot on the device; the host knows which rows probe (from the step's one sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from effdecode.config import DecodeConfig
from effdecode.generation.markers import ends_with, last_occurrence, resolve_marker

OPEN_END = 1 << 62  # span end of a row still thinking


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


class ThinkingController:
    """Per-slot thinking state of one call in the plain loop (see the module docstring).

    Parameters
    ----------
    plan : ThinkingPlan
    input_ids : torch.Tensor
        int64 ``[B, T0]`` left-padded prompts; ``prompt_lens`` int32 ``[B]``.
    vocab_size : int
        For the saved logits of probing rows.
    """

    def __init__(
        self, plan: ThinkingPlan, input_ids: torch.Tensor, prompt_lens: torch.Tensor, vocab_size: int
    ):
        self.plan = plan
        device = input_ids.device
        slots, width = input_ids.shape
        self.device = device
        self.prompt_lens = prompt_lens.long()
        spans = torch.zeros(slots, 2, dtype=torch.long)
        thinking = torch.zeros(slots, dtype=torch.bool)
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
        self.spans = spans.to(device)
        self.thinking = thinking.to(device)
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

    # -- hooks of the plain loop, in call order ------------------------------------------------------------

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
        # Budget: rows that chose their budget's worth of thinking tokens are forced from now on.
        forcing = self.force_step[rows] >= 0
        if plan.budget is not None:
            start = self.thinking[rows] & ~forcing & (self.thought[rows] >= plan.budget)
            if probing is not None:
                # No forcing mid-probe; but an appended probe rolled back at the budget emits the forced
                # text instead of its row's real next token (a replaced one refeeds its trigger first).
                rolled_back = (
                    torch.as_tensor(stage == plan.answer_tokens, device=device) & ~self.confident[rows]
                )
                start &= ~probing | (rolled_back & (not plan.replace_trigger))
            self.force_step[rows] = torch.where(start, 0, self.force_step[rows])
            forcing = forcing | start
        step = self.force_step[rows]
        forced = self.forced_ids[step.clamp(0, self.forced_ids.shape[0] - 1)]
        token = torch.where(forcing, forced, chosen)
        advanced = torch.where(forcing, step + 1, step)
        self.force_step[rows] = torch.where(advanced >= self.forced_ids.shape[0], -1, advanced)
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

    # -- helpers -------------------------------------------------------------------------------------------

    def _close(self, rows: torch.Tensor, closing: torch.Tensor, end_position: torch.Tensor) -> None:
        self.thinking[rows] &= ~closing
        self.spans[rows, 1] = torch.where(closing, end_position, self.spans[rows, 1])

    def thinking_tokens(self) -> list[int]:
        return self.thought.tolist()
