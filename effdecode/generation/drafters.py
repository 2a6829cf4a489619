"""Who proposes the drafts of speculative decoding, and how many per row.

- :class:`DraftSchedule`: per-row draft lengths ("constant", "heuristic", "adaptive"), pausing rows whose
  drafts keep failing and probing them again later.
- :class:`DraftGate`: the batch-level check that drafting pays at all: steps that verify drafts must give
  more tokens per second than steps that do not, measured, or drafting pauses for the whole batch.
- :class:`NgramDrafter`: prompt lookup in each row's own history (no model, no cache).
- :class:`ModelDrafter`: a small model with its own slot cache, rolled back like the target's (and evicted to
  the target's KV budget with streaming when eviction is on).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from effdecode.cache import KVGeometry, SlotKVCache
from effdecode.compression.kv_compressor import KVCompressor
from effdecode.config import DecodeConfig
from effdecode.generation.request import SpeculationPlan
from effdecode.generation.shared_prefill import replicate_slots
from effdecode.generation.steps import forward_logits, prefill
from effdecode.ops.attention import SlotBatch
from effdecode.ops.ngram import ngram_propose


class DraftSchedule:
    """Per-row draft lengths following the plan's schedule (see :class:`SpeculationPlan`).

    Whatever the schedule, a row whose recent steps gained fewer than ``PAUSE_BELOW`` accepted drafts on
    average stops drafting (speculation costs the drafting and a wider verify forward), and probes again
    after ``FIRST_PROBE`` steps, doubling the wait after every probe that fails (up to ``LAST_PROBE``), so
    it resumes when its text turns predictable and costs little while it does not.
    """

    PAUSE_BELOW = 0.5
    FIRST_PROBE = 8
    LAST_PROBE = 128

    def __init__(self, plan: SpeculationPlan, batch_size: int, device: torch.device) -> None:
        self.plan = plan
        self.lengths = torch.full((batch_size,), plan.num_draft, dtype=torch.int32, device=device)
        self.mean_accepted = torch.ones(batch_size, device=device)  # one failed step pauses a fresh row
        self.probe_wait = torch.full((batch_size,), self.FIRST_PROBE, dtype=torch.int32, device=device)
        self.steps = 0

    def admit(self, slots: torch.Tensor) -> None:
        """Rows new in ``slots`` (int64) start with a fresh schedule."""
        self.lengths[slots] = self.plan.num_draft
        self.mean_accepted[slots] = 1.0
        self.probe_wait[slots] = self.FIRST_PROBE

    def wanted(self, rows: torch.Tensor) -> torch.Tensor:
        """int32 ``[B]`` draft lengths for ``rows`` (int64) this step; 0 for paused rows not due to probe.

        Probes fall on steps that are multiples of a row's wait, so rows with the same wait probe in the same
        step: any drafting row widens the verify forward for the whole batch.
        """
        self.steps += 1
        paused = self.mean_accepted[rows] < self.PAUSE_BELOW
        probing = paused & (self.steps % self.probe_wait[rows] == 0)
        return torch.where(paused & ~probing, 0, self.lengths[rows])

    def next_probe(self, rows: torch.Tensor) -> int:
        """The first step after this one at which a row of ``rows`` (all paused now) probes (one sync)."""
        wait = self.probe_wait[rows]
        return int(((self.steps // wait + 1) * wait).min())

    def update(self, rows: torch.Tensor, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
        """Adjust the lengths of ``rows`` (int64 ``[B]``) after a step's ``proposed``/``accepted`` counts."""
        drafted = proposed > 0  # rows without a proposal (paused, no n-gram match) learn nothing this step
        was_paused = self.mean_accepted[rows] < self.PAUSE_BELOW
        mean = torch.where(drafted, 0.7 * self.mean_accepted[rows] + 0.3 * accepted, self.mean_accepted[rows])
        if drafted.any():
            # A probe that pays resumes drafting at once; one that fails waits twice as long next time.
            resumed = was_paused & drafted & (accepted > 0)
            mean = torch.where(resumed, torch.clamp(accepted.float(), min=self.PAUSE_BELOW), mean)
            failed_probe = was_paused & drafted & (accepted == 0)
            wait = self.probe_wait[rows]
            wait = torch.where(failed_probe, (wait * 2).clamp(max=self.LAST_PROBE), wait)
            self.probe_wait[rows] = torch.where(resumed, self.FIRST_PROBE, wait)
        self.mean_accepted[rows] = mean
        if self.plan.schedule == "constant":
            return
        current = self.lengths[rows]
        if self.plan.schedule == "heuristic":
            updated = torch.where(accepted == proposed, current + 2, current - 1)
        else:
            updated = mean.floor().to(torch.int32) + 1
        updated = updated.clamp(1, self.plan.num_draft).to(torch.int32)
        self.lengths[rows] = torch.where(drafted, updated, current)


class DraftGate:
    """Measured check that drafting pays for the whole batch; while it does not, no row drafts.

    A verify forward is wider than a plain step for every row (rows are padded to the widest), so drafts that
    are accepted too rarely cost more than they save; how much more depends on the device and the model, so
    it is measured: tokens per second of the steps that verified drafts against those that did not (moving
    averages over the call). Plain steps are timed when drafting gains less than ``EXPLORE_BELOW`` tokens per
    row and step (a draft that nearly always lands is never second-guessed). When drafting loses, the gate
    closes for ``FIRST_PAUSE`` steps, doubling after each check that loses again (up to ``LAST_PAUSE``); a
    closed gate makes every step a plain one at a plain step's cost (no proposal, no host copy for it).
    Greedy output never depends on it, only speed.
    """

    MIN_STEPS = 4
    EXPLORE_BELOW = 1.5
    REFRESH = 64  # drafting steps after which plain steps are timed again
    FIRST_PAUSE = 32
    LAST_PAUSE = 256
    DECAY = 0.8

    def __init__(self) -> None:
        self.tokens = [0.0, 0.0]  # decayed sums, [plain, drafting]
        self.seconds = [0.0, 0.0]
        self.samples = [0, 0]  # steps measured of each kind (drafting: since the gate last opened)
        self.gain = [0.0, 0.0]  # decayed sums of tokens per row of drafting steps, and of their weights
        self.last: float | None = None
        self.step = 0
        self.closed_until = 0
        self.pause = self.FIRST_PAUSE
        self.since_plain = 0  # drafting steps since plain steps were last timed

    @property
    def open(self) -> bool:
        return self.step >= self.closed_until

    def rate(self, drafted: bool) -> float:
        return self.tokens[drafted] / max(self.seconds[drafted], 1e-9)

    def record(self, drafted: bool, tokens: int, rows: int) -> None:
        """After a step's sync: it emitted ``tokens`` over ``rows`` rows and did (not) verify drafts."""
        now = time.perf_counter()
        self.step += 1
        if self.last is not None:
            self.tokens[drafted] = self.DECAY * self.tokens[drafted] + tokens
            self.seconds[drafted] = self.DECAY * self.seconds[drafted] + (now - self.last)
            self.samples[drafted] += 1
            if drafted:
                self.gain = [self.DECAY * self.gain[0] + tokens / rows, self.DECAY * self.gain[1] + 1.0]
                self.since_plain += 1
            else:
                self.since_plain = 0
        self.last = now
        if not drafted or self.samples[True] < self.MIN_STEPS:
            return
        if self.gain[0] >= self.EXPLORE_BELOW * self.gain[1]:
            return
        if self.samples[False] < self.MIN_STEPS or self.since_plain >= self.REFRESH:
            self.samples[False] = 0
            self.closed_until = self.step + self.MIN_STEPS  # time a few plain steps
            self.since_plain = 0
        elif self.rate(True) < self.rate(False):
            self.closed_until = self.step + self.pause
            self.pause = min(2 * self.pause, self.LAST_PAUSE)
            self.samples[True] = 0
        else:
            self.pause = self.FIRST_PAUSE


class NgramDrafter:
    """Prompt lookup: propose what followed the most recent earlier occurrence of the row's last n tokens."""

    forwards = 0
    nbytes = 0  # no cache

    def __init__(self, plan: SpeculationPlan, backend: str) -> None:
        self.plan = plan
        self.backend = backend

    def prefill(self, admission, groups=None) -> None:
        pass

    def propose(self, rows, max_draft, draft_lens, history, history_lens, kv_bound, choose, slot_span=0):
        drafts, found = ngram_propose(
            history, history_lens, rows, self.plan.max_ngram, self.plan.min_ngram, max_draft, self.backend
        )
        return drafts, torch.minimum(found, draft_lens), None

    def rollback(self, rows: torch.Tensor, kept_lens: torch.Tensor) -> None:
        pass  # nothing cached


class ModelDrafter:
    """A small model with its own slot cache drafts ``k`` tokens per row, batched over rows.

    Without eviction the draft cache holds each row's history ``[0, cache_len)``: cache index, history index
    and RoPE position agree. With eviction (``eviction`` given) the cache is compacted by its own
    :class:`KVCompressor` and holds an ordered subset of the history; ``fed`` (the history tokens consumed,
    i.e. the next token's history index and RoPE position) then lives in ``cache.positions``, which is where
    compaction reads a row's next position, while ``cache.cache_lens`` counts the entries held.

    Parameters
    ----------
    draft : torch.nn.Module
        The draft model.
    batch_size : int
        Slots (rows of the call).
    capacity : int
        Entries per slot: the whole sequence without eviction, the target's compressed capacity with it.
    backend : str
        Attention backend.
    eviction : DecodeConfig, optional
        Eviction settings of the draft cache (``kv_budget`` set); None keeps every entry.
    prompt_lens : torch.Tensor, optional
        int32 ``[batch_size]`` prompt tokens per row (device); required with ``eviction``.
    """

    def __init__(
        self,
        draft: torch.nn.Module,
        batch_size: int,
        capacity: int,
        backend: str,
        eviction: DecodeConfig | None = None,
        prompt_lens: torch.Tensor | None = None,
    ) -> None:
        self.model = draft
        self.backend = backend
        self.cache = SlotKVCache(
            KVGeometry.from_config(draft.config), batch_size, capacity, draft.dtype, draft.device
        )
        self.compressor = KVCompressor(eviction, self.cache, prompt_lens) if eviction is not None else None
        # [slots] history tokens consumed per slot: without eviction, the entry count itself.
        self.fed = self.cache.positions if self.compressor is not None else self.cache.cache_lens
        self.forwards = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the draft cache and of its compressor's side buffers (counted in ``kv_peak_bytes``)."""
        return self.cache.nbytes + (self.compressor.nbytes if self.compressor is not None else 0)

    def prefill(self, admission, groups=None) -> None:
        """Fill the admitted rows' slots with their prompts (one forward; with ``groups`` each prompt's first
        row only, its KV then copied into the other rows' slots, as the target's)."""
        if self.compressor is not None:
            self.compressor.admit(admission.slots, admission.prompt_lens, admission.prompt_lens_host)
            groups = None  # (never set together: eviction prefills every row)
        first = admission if groups is None else admission.subset(groups[0])
        prefill(
            self.model, self.cache, first.input_ids, first.prompt_lens, self.backend, slots=first.slots_dev,
            lens_host=first.prompt_lens_host,
        )  # fmt: skip
        if groups is not None:
            sources = first.slots_dev[torch.as_tensor(groups[1], device=first.slots_dev.device)]
            replicate_slots(self.cache, sources, admission.slots_dev, admission.input_ids.shape[1])
        self.forwards += 1

    def propose(self, rows, max_draft, draft_lens, history, history_lens, kv_bound, choose, slot_span=0):
        """Draft ``max_draft`` tokens for every row in ``rows``; row ``b`` offers the first ``draft_lens[b]``.

        The first forward feeds the tokens the draft cache lacks (one; two after a step whose drafts were
        all accepted; more after the row paused drafting), right-aligned; then one token per forward. With
        eviction, rows are compacted before a forward that would take them past the KV limit, and the first
        forward may feed only the most recent of the lacking tokens (see :meth:`_make_room`). ``slot_span``:
        host bound of ``rows`` (see :class:`~effdecode.ops.slot_batch.SlotBatch`; 0 unknown).
        Returns drafts int64 ``[B, max_draft]``, their lengths, and the draft's distributions
        ``[B, max_draft, V]`` when sampling (None for greedy).
        """
        rows_long = rows.long()
        cache = self.cache
        total = history_lens[rows_long]
        pending = (total - self.fed[rows_long]).to(torch.int32)
        if self.compressor is None:
            feed, width, rows_host = pending, int(pending.max()), None
        else:
            rows_host, feed_host = self._make_room(rows, pending)
            feed, width = torch.as_tensor(feed_host, device=rows.device), int(feed_host.max())
            kv_bound = self._kv_bound(rows_host)
        columns = torch.arange(width, device=rows.device)
        index = total[:, None] - width + columns[None, :]  # history index == RoPE position
        valid = columns[None, :] >= (width - feed)[:, None]
        input_ids = history[rows_long[:, None], index.clamp(min=0)].masked_fill(~valid, 0)
        batch = SlotBatch(
            rows, cache.cache_lens, feed, kv_len_bound=kv_bound, backend=self.backend, slot_span=slot_span
        )
        drafts = torch.empty(rows.shape[0], max_draft, dtype=torch.long, device=rows.device)
        probs = []
        ones = torch.ones_like(pending)
        logits = forward_logits(self.model, cache, batch, input_ids, index.clamp(min=0))
        cache.cache_lens.index_add_(0, rows_long, feed)
        if rows_host is not None:
            self.fed[rows_long] = total.long()  # tokens left unfed count as consumed: they are skipped
        self.forwards += 1
        for i in range(max_draft):
            token, distribution = choose(logits)
            drafts[:, i] = token
            if distribution is not None:
                probs.append(distribution)
            if i == max_draft - 1:
                break
            if rows_host is None:
                bound = kv_bound + i + 1
            else:
                self._make_room_for_one(rows_host)
                bound = self._kv_bound(rows_host)
            batch = SlotBatch(
                rows,
                cache.cache_lens,
                ones,
                kv_len_bound=bound,
                backend=self.backend,
                q_full=True,
                slot_span=slot_span,
            )
            logits = forward_logits(self.model, cache, batch, token[:, None], (total + i)[:, None])
            cache.cache_lens.index_add_(0, rows_long, ones)
            if rows_host is not None:
                self.fed[rows_long] += 1
            self.forwards += 1
        return drafts, draft_lens, torch.stack(probs, dim=1) if probs else None

    def _make_room(self, rows: torch.Tensor, pending: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """With eviction: compact the rows a catch-up forward would take past the KV limit; size the feed.

        A compacted row has room for ``limit - kv_budget`` (``compress_every``) entries at least. A row that
        lacks more tokens than its room (it paused drafting for long) feeds only the most recent ones that
        fit: the older ones are never cached, which costs the draft some context (its acceptance rate), never
        correctness (verification alone decides the output).

        Parameters
        ----------
        rows : torch.Tensor
            int32 ``[B]`` slots about to draft.
        pending : torch.Tensor
            int32 ``[B]`` history tokens each row's draft cache has not consumed yet (>= 1).

        Returns
        -------
        rows_host : np.ndarray
            int64 ``[B]``, ``rows`` on the host.
        feed : np.ndarray
            int32 ``[B]``, tokens the catch-up forward feeds per row, ``1 <= feed <= pending``.
        """
        compressor = self.compressor
        # The proposal's one sync: rollbacks changed the entry counts on the device only.
        synced = torch.stack([rows, pending, self.cache.cache_lens[rows.long()]]).cpu().numpy()
        rows_host, pending_host, lens = synced.astype(np.int64)
        compressor.lens[rows_host] = lens
        # A rollback cuts below the entries a compaction kept only if that compaction fell between draft
        # forwards; the entries past the new end are then contiguous again.
        compressor.fresh_from[rows_host] = np.minimum(compressor.fresh_from[rows_host], lens)
        compressor.compact(rows_host[lens + pending_host > compressor.limit])
        feed = np.minimum(pending_host, compressor.limit - compressor.lens[rows_host])
        compressor.advance(rows_host, feed)
        return rows_host, feed.astype(np.int32)

    def _make_room_for_one(self, rows_host: np.ndarray) -> None:
        """With eviction: compact the rows at the KV limit before a forward adds one entry to each of them."""
        compressor = self.compressor
        compressor.compact(compressor.due(rows_host))
        compressor.advance(rows_host, 1)

    def _kv_bound(self, rows_host: np.ndarray) -> int:
        """Host-side bound of the entries ``rows_host`` hold after the forward (counted in by ``advance``)."""
        return min(int(self.compressor.lens[rows_host].max()), self.cache.capacity)

    def rollback(self, rows: torch.Tensor, kept_lens: torch.Tensor) -> None:
        """Drop the entries of rejected drafts (``kept_lens`` int32 ``[B]``: a row's tokens but the newest).

        Without eviction the cache holds the history ``[0, cache_len)``, so it is cut at ``kept_lens`` (the
        target's cache length would say the same without eviction). With eviction it holds part of the
        history ``[0, fed)`` in position order, and the rejected drafts (positions ``kept_lens`` to
        ``fed - 1``) are its newest entries, which a compaction between draft forwards keeps (streaming keeps
        the most recent), so its last ``fed - kept_lens`` entries go. Were the budget all protected entries,
        some older ones would go too: never a rejected one stays.
        """
        if self.compressor is None:
            self.cache.cache_lens[rows] = torch.minimum(self.cache.cache_lens[rows], kept_lens)
            return
        fed = self.fed[rows]
        rejected = (fed - kept_lens).clamp(min=0)
        self.cache.cache_lens[rows] = (self.cache.cache_lens[rows] - rejected).clamp(min=0).to(torch.int32)
        self.fed[rows] = torch.minimum(fed, kept_lens.long())


def propose_for_some(
    drafter, rows, drafting, max_draft, wanted, history, history_lens, bound, choose, slot_span=0
):
    """Drafts of the rows at indices ``drafting`` (host) only, scattered into ``[B, ...]`` (0 elsewhere)."""
    index = torch.as_tensor(drafting, device=rows.device)
    drafts, lens, probs = drafter.propose(
        rows[index], max_draft, wanted[index], history, history_lens, bound, choose, slot_span
    )
    all_drafts = drafts.new_zeros(rows.shape[0], drafts.shape[1]).index_copy_(0, index, drafts)
    all_lens = lens.new_zeros(rows.shape[0]).index_copy_(0, index, lens)
    all_probs = None
    if probs is not None:
        all_probs = probs.new_zeros(rows.shape[0], *probs.shape[1:]).index_copy_(0, index, probs)
    return all_drafts, all_lens, all_probs
