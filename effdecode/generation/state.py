"""Per-slot state of one call, the rows still decoding, and what a step plans and emits.

Everything per row lives in buffers indexed by *slot* (``[slots, ...]``); ``rows`` (int32, on the device, with
its int64 and host copies) lists the slots in the forward batch, ``requests_*`` the request row each holds.
Rows leave in one place (:meth:`DecodeState.shrink`); with continuous batching (``DecodeConfig.max_slots``)
waiting requests take the freed slots there (:meth:`DecodeState.admit`, joining after the step's forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from effdecode.generation.request import GenerationRequest
from effdecode.generation.steps import right_aligned_windows


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
    chosen: torch.Tensor | None = None  # int64 [R]: tokens a compiled step chose in its graph (argmax, draw)
    chosen_scores: torch.Tensor | None = None  # float32 [R, V]: the warped scores it drew from (sampling)

    @property
    def num_cols(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class Admission:
    """Waiting requests admitted into free slots in one step (prefilled together in one forward).

    Attributes
    ----------
    slots, requests : np.ndarray
        int64 ``[A]`` the slots and the request rows they now hold (host), in request order.
    slots_dev, requests_dev : torch.Tensor
        The same on the device.
    input_ids : torch.Tensor
        int64 ``[A, T0]`` their left-padded prompts (as in the request).
    prompt_lens : torch.Tensor
        int32 ``[A]`` (``prompt_lens_host`` on the host).
    inputs_embeds : torch.Tensor or None
        ``[A, T0, H]`` where the request gives them.
    """

    slots: np.ndarray
    requests: np.ndarray
    slots_dev: torch.Tensor
    requests_dev: torch.Tensor
    input_ids: torch.Tensor
    prompt_lens: torch.Tensor
    prompt_lens_host: np.ndarray
    inputs_embeds: torch.Tensor | None = None

    def subset(self, index: np.ndarray) -> Admission:
        """The admission of rows ``index`` (host positions into this one) alone."""
        device_index = torch.as_tensor(index, device=self.slots_dev.device)
        embeds = self.inputs_embeds
        return Admission(
            self.slots[index], self.requests[index], self.slots_dev[device_index],
            self.requests_dev[device_index], self.input_ids.index_select(0, device_index),
            self.prompt_lens.index_select(0, device_index), self.prompt_lens_host[index],
            embeds.index_select(0, device_index) if embeds is not None else None,
        )  # fmt: skip


class DecodeState:
    """The call's per-slot buffers, the active rows (slots) and the per-request results.

    A slot holds one request at a time (``request_of``); with ``slots < B`` (``DecodeConfig.max_slots``)
    waiting requests take the slots of finished ones (:meth:`admit`, :meth:`join`). Per-request results
    (``out_sequences``, ``out_new_tokens``, ``row_forwards``) are indexed by request row and filled when a row
    leaves (:meth:`harvest`); with ``slots == B`` slot ``i`` holds request ``i`` throughout.

    Parameters
    ----------
    request : GenerationRequest
    lookahead : int
        Most columns a step may write past a row's end.
    keep_history : bool
        Keep left-aligned histories (prompt without padding, then new tokens) for the drafters.
    slots : int
        KV slots of the call (``<= B``).
    """

    def __init__(self, request: GenerationRequest, lookahead: int, keep_history: bool, slots: int) -> None:
        input_ids = request.input_ids
        device = input_ids.device
        self.device = device
        self.request = request
        self.batch_size, self.prompt_width = input_ids.shape
        self.num_slots = slots
        self.max_new = request.max_new_tokens
        self.pad = request.pad_token_id if request.pad_token_id is not None else 0
        width = self.prompt_width + self.max_new + lookahead + 1
        self.sequences = torch.full((slots, width), self.pad, dtype=torch.long, device=device)
        self.new_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.out_sequences = torch.full((self.batch_size, width), self.pad, dtype=torch.long, device=device)
        self.out_sequences[:, : self.prompt_width] = input_ids
        self.out_new_tokens = torch.zeros(self.batch_size, dtype=torch.long, device=device)
        self.width_bound = 0  # host-side bound of max(new_tokens) over the active rows
        self.history = self.history_lens = None
        if keep_history:
            capacity = self.prompt_width + self.max_new + lookahead
            self.history = torch.zeros(slots, capacity, dtype=torch.long, device=device)
            self.history_lens = torch.zeros(slots, dtype=request.prompt_lens.dtype, device=device)
        self.rows = torch.zeros(0, dtype=torch.int32, device=device)
        self.rows_long = self.rows.long()
        self.rows_host = np.zeros(0, dtype=np.int64)
        self.requests_long = self.rows_long  # request row of each active row (device / host)
        self.requests_host = self.rows_host
        self.leading = True  # rows == arange(R): the attention op may skip the gather
        self.slot_span = 0  # host: every active row's slot is below it (the attention op may read a view)
        self.request_of = np.full(slots, -1, dtype=np.int64)  # request row held by each slot
        self.request_of_dev = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.order = np.arange(self.batch_size)  # admission order of the requests
        self.next_request = 0  # requests order[next_request:] wait for a slot
        # Asked which waiting requests may still start (self-consistency: rows of a decided prompt never do);
        # those it refuses are cancelled (0 new tokens) and listed in ``cancelled`` for the step.
        self.admissible = None
        self.cancelled = np.zeros(0, dtype=np.int64)
        self.free_slots = list(range(slots))  # host, kept in increasing order
        self.prompt_lens_host = request.prompt_lens.cpu().numpy()
        self.ones = torch.ones(slots, dtype=torch.int32, device=device)  # never written
        self.forwards = 0  # target forwards so far (prefill included)
        self.prefills = 0  # of which prefills (admissions)
        # Per slot: step forwards (not prefills) before its row joined; a row takes part in its own prefill
        # and every step forward after it until it leaves.
        self.joined = torch.zeros(slots, dtype=torch.long, device=device)
        self.row_forwards = torch.zeros(self.batch_size, dtype=torch.long, device=device)  # set on leaving
        self.reused = False  # some slot held more than one request
        # Live rows may hold different numbers of new tokens (admitted after the first step; thinking control
        # sets it too): transformers' view of a row then has its own width (user_hooks.length_groups).
        self.ragged = False

    @property
    def waiting(self) -> int:
        """Requests not admitted yet."""
        return self.batch_size - self.next_request

    def waiting_requests(self) -> np.ndarray:
        """int64 the requests not admitted yet, in admission order (host)."""
        return self.order[self.next_request :]

    def _take(self, free: int) -> np.ndarray:
        """Up to ``free`` waiting requests to admit, in order; those ``admissible`` refuses on the way are
        cancelled (``self.cancelled``)."""
        waiting = self.waiting_requests()
        if self.admissible is None:
            self.next_request += min(free, len(waiting))
            return waiting[:free]
        allowed = self.admissible(waiting)
        taken = np.flatnonzero(allowed)[:free]
        seen = taken[-1] + 1 if len(taken) == free and free > 0 else len(waiting)
        self.cancelled = waiting[:seen][~allowed[:seen]]
        self.next_request += seen
        return waiting[taken]

    def admit(self) -> Admission | None:
        """Waiting requests into the free slots (admission order, lowest slots first), or None."""
        self.cancelled = self.cancelled[:0]
        if not self.free_slots or not self.waiting:
            return None
        requests = self._take(len(self.free_slots)).astype(np.int64)
        count = len(requests)
        if count == 0:
            return None
        slots = np.asarray(self.free_slots[:count], dtype=np.int64)
        del self.free_slots[:count]
        self.reused |= bool((self.request_of[slots] >= 0).any())
        self.ragged |= self.forwards > 0
        request, device = self.request, self.device
        slots_dev = torch.as_tensor(slots, device=device)
        requests_dev = torch.as_tensor(requests, device=device)
        if count == self.batch_size and (requests == np.arange(count)).all():  # all at once: no gathers
            input_ids, prompt_lens, embeds = request.input_ids, request.prompt_lens, request.inputs_embeds
        else:
            input_ids = request.input_ids.index_select(0, requests_dev)
            prompt_lens = request.prompt_lens.index_select(0, requests_dev)
            embeds = request.inputs_embeds
            embeds = embeds.index_select(0, requests_dev) if embeds is not None else None
        self.request_of[slots] = requests
        self.request_of_dev[slots_dev] = requests_dev
        self.sequences[slots_dev] = self.out_sequences.index_select(0, requests_dev)
        self.new_tokens[slots_dev] = 0
        if self.history is not None:
            columns = torch.arange(self.prompt_width, device=device)
            padding = (self.prompt_width - prompt_lens.long())[:, None]
            source = (columns[None, :] + padding).clamp(max=self.prompt_width - 1)
            self.history[slots_dev, : self.prompt_width] = input_ids.gather(1, source)
            self.history_lens[slots_dev] = prompt_lens.to(self.history_lens.dtype)
        return Admission(
            slots, requests, slots_dev, requests_dev, input_ids, prompt_lens, self.prompt_lens_host[requests],
            embeds,
        )  # fmt: skip

    def join(self, admission: Admission) -> None:
        """The admitted slots join the active rows (after the step's rows)."""
        self.joined[admission.slots_dev] = self.forwards - self.prefills  # (after the step's forward)
        self.rows_host = np.concatenate([self.rows_host, admission.slots])
        self.requests_host = np.concatenate([self.requests_host, admission.requests])
        self._rows_changed()

    def _rows_changed(self) -> None:
        device = self.device
        self.rows_long = torch.as_tensor(self.rows_host, device=device)
        self.rows = self.rows_long.to(torch.int32)
        self.requests_long = torch.as_tensor(self.requests_host, device=device)
        self.leading = bool((self.rows_host == np.arange(len(self.rows_host))).all())
        self.slot_span = int(self.rows_host.max()) + 1 if len(self.rows_host) else 0

    @property
    def num_rows(self) -> int:
        return len(self.rows_host)

    def ends(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """int64 ``[R]``: each active row's (or each of ``rows``') last column in ``sequences``."""
        rows = self.rows_long if rows is None else rows
        return self.prompt_width + self.new_tokens[rows] - 1

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

    def history_for_processors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[R, L]`` the active rows' (or ``rows``') tokens so far, each right-aligned in ``L`` columns: its
        prompt as given (padding included, as transformers has it) and its new tokens, left-filled with pad
        where a row has fewer new tokens than the longest (admitted later, or back from a probe)."""
        rows = self.rows_long if rows is None else rows
        width = self.prompt_width + min(self.width_bound, self.max_new)
        return right_aligned_windows(self.sequences, rows, self.ends(rows), width, self.pad)

    def full_view(self, width: int, windows: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' ``input_ids`` ``[B, width]`` (row ``i`` always request ``i``): the active rows'
        ``windows`` (default: each one's last ``width`` tokens), finished rows' tokens then pads, waiting
        rows' prompts then pads."""
        if windows is None:
            windows = right_aligned_windows(self.sequences, self.rows_long, self.ends(), width, self.pad)
        full = self.out_sequences[:, :width].clone()
        full[self.requests_long] = windows
        return full

    def shrink(self, stay: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Rows where ``stay`` (bool ``[R]``, host) is False leave and free their slots.

        Returns the device index of the rows that stay, and the slots and request rows that left (host).
        """
        leaving = ~stay
        slots, requests = self.rows_host[leaving], self.requests_host[leaving]
        self.harvest(slots, requests)
        self.free_slots = sorted(self.free_slots + slots.tolist())
        keep = torch.as_tensor(np.flatnonzero(stay), device=self.device)
        self.rows_host, self.requests_host = self.rows_host[stay], self.requests_host[stay]
        self._rows_changed()
        return keep, slots, requests

    def harvest(self, slots: np.ndarray, requests: np.ndarray) -> None:
        """Copy the results of the rows in ``slots`` (host) into their request rows (device ops only)."""
        if slots.size == 0:
            return
        if self.num_slots == self.batch_size and not self.reused:
            slots_dev = requests_dev = torch.as_tensor(slots, device=self.device)
        else:
            slots_dev = torch.as_tensor(slots, device=self.device)
            requests_dev = torch.as_tensor(requests, device=self.device)
        self.out_sequences[requests_dev] = self.sequences.index_select(0, slots_dev)
        self.out_new_tokens[requests_dev] = self.new_tokens.index_select(0, slots_dev)
        steps = self.forwards - self.prefills
        self.row_forwards[requests_dev] = 1 + steps - self.joined.index_select(0, slots_dev)

    def result(self) -> torch.Tensor:
        """``[B, T0 + longest]`` sequences: the prompts, then each row's tokens (<= ``max_new_tokens``)."""
        self.out_new_tokens.clamp_(max=self.max_new)  # a committed probe may run past max_new_tokens
        columns = torch.arange(self.out_sequences.shape[1], device=self.device)[None, :]
        self.out_sequences.masked_fill_(columns >= self.prompt_width + self.out_new_tokens[:, None], self.pad)
        return self.out_sequences[:, : self.prompt_width + int(self.out_new_tokens.max())]
