"""Self-consistency participant of the decode loop: answers of finished rows, votes, early-stop policies.

A prompt's k rows (``num_return_sequences``) are request rows ``p * k .. p * k + k - 1`` (held by any slots:
``state.request_of``; with ``max_slots`` slots are reused). Host work happens only in
steps where rows leave: their new tokens (and confidences) come to the host in one extra copy, their answers
are read, the prompt's policy decides, and a decided prompt's other rows leave the batch at once
(:meth:`Consistency.after_sync`, which edits the step's ``stay`` mask). Steps where no row leaves cost nothing
more, except ``"confidence"``, whose per-row running log-probabilities stay on the device and whose low-
confidence stop joins the step's own ``leaving`` mask (no extra copy).

Continuous batching (``max_slots``): rows of a decided prompt never start (the admission asks
:meth:`admissible`), and with ``esc``/``adaptive`` rows are admitted window by window across prompts
(:meth:`admission_order`): the first ``consistency_window`` rows of every prompt, then the next ones, so
that a prompt decided by its first windows never starts the rest: ESC's windows inside one call.
"""

from __future__ import annotations

import numpy as np
import torch

from effdecode.consistency.answers import AnswerReader
from effdecode.consistency.policies import adaptive_stops, confidence_threshold, esc_stops, weighted_vote
from effdecode.consistency.vote import PromptVote
from effdecode.generation.request import GenerationRequest

DEFAULT_THRESHOLDS = {"adaptive": 0.95, "confidence": 0.9}


class Consistency:
    """Answers, votes and stop decisions for the k rows of each prompt of one call.

    Parameters
    ----------
    request : GenerationRequest
        With ``decode_config.answer`` set.
    eos_ids : torch.Tensor
        int64 ``[E]``.
    """

    def __init__(self, request: GenerationRequest, eos_ids: torch.Tensor) -> None:
        config = request.decode_config
        self.k = max(1, request.num_return_sequences)
        self.reader = AnswerReader(config.answer, request.tokenizer)
        self.policy = config.consistency
        self.window = config.consistency_window
        self.threshold = config.consistency_threshold or DEFAULT_THRESHOLDS.get(self.policy, 0.0)
        self.warmup = config.consistency_warmup
        self.eos = set(eos_ids.tolist())
        batch_size = request.input_ids.shape[0]
        self.num_prompts = batch_size // self.k
        self.order: list[list[int]] = [[] for _ in range(self.num_prompts)]  # slots in finish order
        self.answers: list = [None] * batch_size
        self.weights = np.zeros(batch_size)
        self.recorded = np.zeros(batch_size, dtype=bool)
        self.stopped = np.zeros(batch_size, dtype=bool)  # cancelled by the prompt's decision / low confidence
        self.decided = np.zeros(self.num_prompts, dtype=bool)
        self.never_started = np.zeros(batch_size, dtype=bool)  # cancelled before their admission
        self.bars = np.full(self.num_prompts, -np.inf)  # confidence: each prompt's calibrated bar
        self.calibrated = np.zeros(self.num_prompts, dtype=bool)  # confidence: the prompt's bar is set
        self.lowest = np.full(batch_size, np.nan)  # confidence: each finished row's lowest window confidence
        self.confidence = RowConfidence(batch_size, config.consistency_tokens, request.input_ids.device) if (
            self.policy == "confidence"
        ) else None  # fmt: skip

    # -- hooks of the loop --------------------------------------------------------------------------------

    def observe(
        self, logits: torch.Tensor, q_lens: torch.Tensor | None, tokens: torch.Tensor, admitted: bool = False
    ) -> None:
        """The step's logits (``[R, V]`` or ``[R, T, V]``) and emitted runs ``[R, W]`` (confidence only);
        ``admitted``: those of rows just admitted, whose first tokens join after the step's rows."""
        if self.confidence is not None:
            self.confidence.observe(logits, q_lens, tokens, admitted)

    def leaving(self, state, counts: torch.Tensor, leaving: torch.Tensor) -> torch.Tensor:
        """The step's ``leaving`` mask ``[R]`` plus rows whose confidence fell below their prompt's bar (a row
        that ends on its own in this step, EOS or ``max_new_tokens``, is not stopped)."""
        if self.confidence is None:
            return leaving
        rows = state.rows_long
        ending = leaving | (state.new_tokens[rows] >= state.max_new)
        return leaving | self.confidence.after_append(rows, counts, ending)

    def after_sync(self, state, stay: np.ndarray, done: bool) -> tuple[np.ndarray, bool]:
        """Read the leaving rows' answers (one copy), decide their prompts, stop decided prompts' rows."""
        gone = ~stay
        if not gone.any():
            return stay, done
        self._record(state, state.rows_host[gone], state.requests_host[gone])
        if self.policy is None:
            return stay, done
        cancel = self.decided[state.requests_host // self.k] & stay
        if cancel.any():
            stay = stay & ~cancel
            self.stopped[state.requests_host[cancel]] = True
        return stay, done or not (stay.any() or state.waiting)

    def admissible(self, requests: np.ndarray) -> np.ndarray:
        """bool mask over ``requests`` (host request rows): False for rows of a decided prompt."""
        return ~self.decided[np.asarray(requests) // self.k]

    def cancel(self, requests: np.ndarray) -> None:
        """Waiting ``requests`` that will never start (their prompt is decided): stopped, 0 tokens."""
        self.stopped[requests] = True
        self.never_started[requests] = True

    def admission_order(self, batch_size: int) -> np.ndarray:
        """Request rows in the order to admit them: window ``i`` of every prompt before window ``i + 1``
        (``esc``/``adaptive``); request order otherwise."""
        requests = np.arange(batch_size)
        if self.policy not in ("esc", "adaptive"):
            return requests
        within = requests % self.k
        return np.lexsort((within, requests // self.k, within // self.window))

    def admit(self, slots: torch.Tensor, requests: np.ndarray) -> None:
        """Rows ``requests`` start in ``slots``: a fresh running confidence, their prompt's bar."""
        if self.confidence is not None:
            self.confidence.reset(slots, torch.as_tensor(self.bars[requests // self.k], device=slots.device))

    # -- host work on finished rows -----------------------------------------------------------------------

    def _record(self, state, slots: np.ndarray, requests: np.ndarray) -> None:
        fresh = ~self.recorded[requests] & ~self.stopped[requests]  # (stopped rows may still be listed)
        slots, requests = slots[fresh], requests[fresh]
        if slots.size == 0:
            return
        index = torch.as_tensor(slots, device=state.device)
        width = min(state.width_bound, state.max_new)
        parts = [state.new_tokens[index].double()[:, None]]
        if self.confidence is not None:
            parts.append(self.confidence.summary(index))
        parts.append(state.sequences[index, state.prompt_width : state.prompt_width + width].double())
        packed = torch.cat(parts, dim=1).cpu().numpy()  # the extra copy, only in steps where rows leave
        extra = 1 + (3 if self.confidence is not None else 0)
        for request, row in zip(requests.tolist(), packed, strict=True):
            count = int(min(row[0], width))
            tokens = row[extra : extra + count].astype(np.int64).tolist()
            while tokens and tokens[-1] in self.eos:
                tokens.pop()
            low = self.confidence is not None and bool(row[1])
            self.recorded[request] = True
            self.stopped[request] |= low
            self.answers[request] = None if low else self.reader(tokens)
            self.weights[request] = 1.0 if self.confidence is None else float(np.exp(row[3]))
            prompt = request // self.k
            self.order[prompt].append(request)
            if self.confidence is not None:
                self.lowest[request] = row[2]
                self._calibrate(state, prompt)
            if not self.decided[prompt]:
                self.decided[prompt] = self._decides(prompt)

    def _decides(self, prompt: int) -> bool:
        answers = [self.answers[slot] for slot in self.order[prompt] if not self.stopped[slot]]
        if self.policy == "esc":
            return esc_stops(answers, self.window)
        if self.policy == "adaptive":
            return adaptive_stops(answers, self.threshold)
        return False

    def _calibrate(self, state, prompt: int) -> None:
        """Once the prompt's first ``warmup`` rows finished, its rows get their bar (DeepConf-online)."""
        if self.calibrated[prompt]:
            return
        finished = [slot for slot in self.order[prompt] if not self.stopped[slot]]
        if len(finished) < self.warmup:
            return
        bar = confidence_threshold(self.lowest[finished], self.threshold)
        self.bars[prompt] = bar  # rows of the prompt admitted later start with it
        holding = np.flatnonzero((state.request_of >= 0) & (state.request_of // self.k == prompt))
        self.confidence.set_bar(holding, bar)  # a host-to-device write, in this step only
        self.calibrated[prompt] = True

    # -- result --------------------------------------------------------------------------------------------

    def finish(self, state, max_new: int) -> list[PromptVote]:
        """Rows still running are read as finished (after ``state.harvest``); one :class:`PromptVote` per
        prompt."""
        self._record(state, state.rows_host, state.requests_host)
        spent = state.out_new_tokens.clamp(max=max_new).tolist()
        votes = []
        for prompt in range(self.num_prompts):
            slots = range(prompt * self.k, (prompt + 1) * self.k)  # (request rows)
            # Ties go to the answer of the lowest row, as effdecode.vote counts them.
            best, share = weighted_vote([self.answers[r] for r in slots], [self.weights[r] for r in slots])
            natural = [spent[slot] for slot in slots if self.recorded[slot] and not self.stopped[slot]]
            typical = float(np.mean(natural)) if natural else float(max_new)
            # A stopped row would have run at least one more token (rows that finished on their own are
            # the short ones when all rows advance together: this is a lower bound of full SC's cost).
            full = sum(max(spent[s] + 1, typical) if self.stopped[s] else spent[s] for s in slots)
            votes.append(
                PromptVote(
                    best, share, [self.answers[slot] for slot in slots],
                    [float(self.weights[slot]) if self.answers[slot] is not None else 0.0 for slot in slots],
                    rows_run=self.k - int(self.never_started[list(slots)].sum()),
                    rows_stopped=int(self.stopped[list(slots)].sum()),
                    tokens_spent=sum(spent[slot] for slot in slots), tokens_full=round(full),
                    rows_finished=len(natural),
                )
            )  # fmt: skip
        return votes


class RowConfidence:
    """Per-slot running token confidence on the device (``"confidence"``).

    A row's confidence is the mean log-probability (under the model's raw distribution) of its last ``window``
    tokens; ``lowest`` tracks its minimum over the row so far, ``total`` / ``count`` its mean over the row
    (the vote weight is ``exp`` of that: the geometric-mean token probability). A row leaves once its window
    is full and its confidence is below its prompt's ``bar`` (``-inf`` until calibrated).
    """

    def __init__(self, batch_size: int, window: int, device: torch.device) -> None:
        self.window = window
        self.ring = torch.zeros(batch_size, window, dtype=torch.float32, device=device)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.total = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.lowest = torch.full((batch_size,), float("inf"), dtype=torch.float32, device=device)
        self.bar = torch.full((batch_size,), float("-inf"), dtype=torch.float32, device=device)
        self.low = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.pending: torch.Tensor | None = None  # float32 [R, W] log-probs of the step's emitted runs
        self.admitted: torch.Tensor | None = None  # float32 [A, 1] those of the rows admitted in the step

    def observe(
        self, logits: torch.Tensor, q_lens: torch.Tensor | None, tokens: torch.Tensor, admitted: bool = False
    ) -> None:
        width = tokens.shape[1]
        if logits.dim() == 2:  # one token per row: the last column predicted it
            lp = logits.float().log_softmax(-1).gather(1, tokens[:, :1].clamp(min=0))
            lp = torch.cat([lp, lp.new_zeros(lp.shape[0], width - 1)], dim=1)
            if admitted:
                self.admitted = lp
            else:
                self.pending = lp
            return
        num_cols = logits.shape[1]
        start = num_cols - q_lens.long()  # column of each row's last fed token: it predicts emitted token 0
        columns = (start[:, None] + torch.arange(width, device=logits.device)[None, :]).clamp(
            max=num_cols - 1
        )
        picked = logits.gather(1, columns[:, :, None].expand(-1, -1, logits.shape[2])).float()
        self.pending = picked.log_softmax(-1).gather(2, tokens.clamp(min=0)[:, :, None])[
            :, :, 0
        ]  # (-1: past the run)

    def after_append(self, rows: torch.Tensor, counts: torch.Tensor, ending: torch.Tensor) -> torch.Tensor:
        """Take in the first ``counts[b]`` log-probs of each row's run; bool ``[R]`` rows that fall low (not
        ``ending`` on their own)."""
        parts = [part for part in (self.pending, self.admitted) if part is not None]  # (the emission's order)
        self.pending = self.admitted = None
        if not parts:
            return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        width = max(part.shape[1] for part in parts)
        lp = torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in parts])
        for j in range(lp.shape[1]):
            present = j < counts
            slot = self.count[rows] % self.window
            current = self.ring[rows, slot]
            self.ring[rows, slot] = torch.where(present, lp[:, j], current)
            self.count[rows] += present.long()
            self.total[rows] += torch.where(present, lp[:, j], 0.0)
            full = present & (self.count[rows] >= self.window)
            mean = self.ring[rows].mean(dim=1)
            self.lowest[rows] = torch.where(full, torch.minimum(self.lowest[rows], mean), self.lowest[rows])
        full = self.count[rows] >= self.window
        low = full & (self.ring[rows].mean(dim=1) < self.bar[rows]) & ~ending
        self.low[rows] |= low
        return low

    def summary(self, index: torch.Tensor) -> torch.Tensor:
        """float64 ``[n, 3]``: (left for low confidence, lowest window confidence, mean log-prob) per slot."""
        count = self.count[index].clamp(min=1)
        mean = self.total[index] / count
        lowest = torch.where(torch.isfinite(self.lowest[index]), self.lowest[index], mean)
        return torch.stack([self.low[index].double(), lowest.double(), mean.double()], dim=1)

    def set_bar(self, slots: np.ndarray, bar: float) -> None:
        self.bar[torch.as_tensor(slots, device=self.bar.device)] = bar

    def reset(self, slots: torch.Tensor, bars: torch.Tensor) -> None:
        """Slots start a new row: nothing seen yet, the given bars (float ``[A]``)."""
        for buffer in (self.ring, self.count, self.total, self.low):
            buffer[slots] = 0
        self.lowest[slots] = float("inf")
        self.bar[slots] = bars.to(self.bar.dtype)
