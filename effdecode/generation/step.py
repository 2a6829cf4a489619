"""One call of the decode loop (:mod:`effdecode.generation.loop`): its participants and the phases of a step.

Each phase is a method that calls the participants' hooks in a fixed order; the participants own their state.
"""

from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import torch

from effdecode.distributed import agree_any, tp_group
from effdecode.generation.admission import RowStats, join_emissions
from effdecode.generation.compiled import chooses_in_graph, samples_in_graph
from effdecode.generation.compressing import Compression
from effdecode.generation.consistency import Consistency
from effdecode.generation.drafting import Drafting
from effdecode.generation.graphs import decode_cache
from effdecode.generation.logits import LogitsPipeline
from effdecode.generation.output import EffdecodeGenerateOutput, LazyHFCache, as_normal_tensors
from effdecode.generation.outputs import StepOutputs
from effdecode.generation.request import GenerationRequest
from effdecode.generation.shared_prefill import replicate_prefill, sharing_groups
from effdecode.generation.slots import row_layout, slots_for
from effdecode.generation.state import DecodeState, Emission, StepPlan
from effdecode.generation.stopping import StopLogic
from effdecode.generation.streams import row_seeds
from effdecode.generation.target import TargetModel
from effdecode.generation.thinking import ThinkingController
from effdecode.generation.user_hooks import user_views_by_length
from effdecode.hf_attention import routed_through_effdecode
from effdecode.ops.verify import philox_offset_increment, verify_greedy, verify_sampling
from effdecode.stats import GenerationStats


class DecodeCall:
    """The participants of one ``generate`` call and the phases of its steps.

    Parameters
    ----------
    model : torch.nn.Module
        The target model.
    request : GenerationRequest
        The validated call.
    started : float
        ``time.perf_counter()`` at the start of the call.
    """

    def __init__(self, model: torch.nn.Module, request: GenerationRequest, started: float) -> None:
        self.model = model
        self.request = request
        self.started = started
        config = request.decode_config
        batch_size = request.input_ids.shape[0]
        lookahead, capacity, _ = row_layout(request)
        slots = slots_for(model, request)  # (ValueErrors before any work)
        thinking = None
        if request.thinking is not None:
            vocab_size = model.get_output_embeddings().weight.shape[0]
            thinking = ThinkingController(request.thinking, slots, model.device, vocab_size)
        self.thinking = thinking
        self.deer = thinking is not None and thinking.plan.early_exit
        speculation = request.speculation
        cache, graphs = decode_cache(model, config, slots, capacity)
        self.target = TargetModel(model, cache, graphs, config.attn_backend)
        self.compile_before = graphs.compile_time_s if graphs is not None else 0.0
        # Greedy with nothing between the forward and the argmax, or sampling with only transformers' warpers
        # between the forward and the draw: a compiled one-token step chooses the tokens itself.
        sample_in_graph = samples_in_graph(request) and graphs is not None
        greedy_in_graph = thinking is None and chooses_in_graph(request)
        self.choose_in_graph = config.compile and (greedy_in_graph or sample_in_graph)
        self.sampling_in_graph = request.sampling if sample_in_graph else None
        self.compression = None
        if config.compresses:
            no_prompts = torch.zeros(slots, dtype=torch.int32, device=model.device)  # filled on admission
            self.compression = Compression(config, cache, no_prompts, thinking)
        # (steps that sample in their graphs read the slots' streams from the graphs' static buffers)
        streams = (graphs.seeds, graphs.offsets) if sample_in_graph else None
        self.pipeline = LogitsPipeline(request, model.device, slots, streams)
        tensor_parallel = tp_group(model) is not None
        self.drafting = (
            Drafting(request, capacity, timed_gate=not (request.do_sample or tensor_parallel), slots=slots)
            if speculation is not None
            else None
        )
        agree = functools.partial(agree_any, model) if tensor_parallel else None
        self.stop = StopLogic(request, self.pipeline.eos_ids, started, agree, slots)
        # Self-consistency (answers, votes, early stop of a prompt's rows): effdecode.generation.consistency.
        self.consistency = Consistency(request, self.pipeline.eos_ids) if config.answer is not None else None
        self.share = 1 if config.compresses else max(1, request.num_return_sequences)  # rows per prefill
        self.outputs = StepOutputs(request)
        self.state = DecodeState(request, lookahead, keep_history=speculation is not None, slots=slots)
        self.state.ragged = thinking is not None  # forced text and probes advance rows by their own counts
        if self.consistency is not None:  # rows of decided prompts never start; windows first (esc/adaptive)
            self.state.admissible = self.consistency.admissible
            if slots < batch_size:  # (with a slot per row, slot i holds request i throughout)
                self.state.order = self.consistency.admission_order(batch_size)
        # Options that need one token per step (they exclude drafting): forced text goes one token a step.
        self.one_token = (
            self.pipeline.needs_history
            or request.output_scores
            or request.output_logits
            or (request.streamer is not None and batch_size > 1)
            or not self.stop.rows_leave
        )
        # Every row emits one token a step (no drafts, no thinking control, no late admissions): the host
        # knows their counts.
        self.uniform = speculation is None and thinking is None and slots == batch_size
        # Per-row streams of the verify sampler (drafts, and forced thinking text fed as drafts).
        if request.do_sample and (speculation is not None or thinking is not None):
            self.seeds = torch.zeros(slots, dtype=torch.long, device=model.device)
            self.offsets = torch.zeros(slots, dtype=torch.long, device=model.device)
        nbytes = cache.nbytes + sum(p.nbytes for p in (self.drafting, self.compression) if p is not None)
        self.stats = GenerationStats(kv_peak_bytes=nbytes, slots=slots)
        self.rows_stats = RowStats(batch_size, model.device, self)
        self.bounds = np.zeros(slots, dtype=np.int64)  # host bounds of each slot's cache length
        self.planned_cols = 1  # columns the last plan fed each row (what the bounds assumed kept)
        self.step_rows = 0  # rows of the step's forward; the rows after them joined from a prefill
        self.last_tokens: torch.Tensor | None = None  # [R] each row's token to feed next
        self.triggered_host: np.ndarray | None = None  # [R] trigger lengths (DEER) from the last sync
        self.any_forcing = False  # some row forces thinking text next step (from the last sync)

    def routing(self):
        stack = contextlib.ExitStack()
        stack.enter_context(routed_through_effdecode(self.model))
        if self.drafting is not None:
            stack.enter_context(self.drafting.routing())
        return stack

    # -- prefill -------------------------------------------------------------------------------------------

    def prefill(self) -> Emission:
        """The first rows' prompts in one forward (every row without ``max_slots``); their first tokens."""
        self.outputs.start()
        return self.join(None, self.admit())

    def admit(self) -> tuple | None:
        """Waiting requests into the free slots: participants start them afresh, one prefill forward over
        them, their first tokens (not yet in ``rows``: :meth:`join` adds them after the step's own rows).

        Returns None (nothing admitted) or ``(admission, emission, forced_counts)``.
        """
        request, state = self.request, self.state
        admission = state.admit()
        if state.cancelled.size:  # waiting rows that will never start (a decided self-consistency prompt)
            self.consistency.cancel(state.cancelled)
            if request.on_rows_finished is not None:
                request.on_rows_finished(state.cancelled.copy(), np.zeros(len(state.cancelled), np.int64))
        if admission is None:
            return None
        slots = admission.slots_dev
        self.pipeline.admit(slots, admission.requests_dev, admission.prompt_lens)
        self.stop.admit(slots)
        if request.do_sample and hasattr(self, "seeds"):
            self.seeds[slots] = row_seeds(self.pipeline.base_seed + 1, admission.requests_dev)
            self.offsets[slots] = 0
        if self.thinking is not None:
            self.thinking.admit(slots, admission.slots, admission.input_ids, admission.prompt_lens)
        if self.consistency is not None:
            self.consistency.admit(slots, admission.requests)
        scores = None
        if self.compression is not None:
            self.compression.admit(admission.slots, admission.prompt_lens, admission.prompt_lens_host)
            scores = self.compression.prefill_scores(admission.slots, admission.prompt_lens_host)
        self.bounds[admission.slots] = admission.prompt_lens_host
        groups = sharing_groups(admission.requests, self.share)
        logits = self._prefill_target(admission, scores, groups)
        state.forwards += 1
        state.prefills += 1
        if self.drafting is not None:
            self.drafting.prefill(admission, groups)
        emission = self._choose_one(logits, rows=slots, requests=admission.requests_dev)
        if self.consistency is not None:
            self.consistency.observe(logits, None, emission.tokens, admitted=True)
        forced_counts = None
        if self.thinking is not None:  # (a thinking budget of 0 forces the first token already)
            _, forced, forced_counts = self.thinking.limits(slots, emission.counts.long())
            emission.tokens, emission.counts = self.thinking.apply_forced(
                emission.tokens, emission.counts, forced, forced_counts
            )
        self.rows_stats.first_token(admission.requests)
        return admission, emission, forced_counts

    def _prefill_target(self, admission, scores, groups) -> torch.Tensor:
        """Logits ``[A, V]`` of the admitted prompts; with ``num_return_sequences = k``, the admitted rows of
        one prompt share one prefill (``groups``: its KV copied into their slots, :mod:`.shared_prefill`)."""
        first = admission if groups is None else admission.subset(groups[0])
        all_leading = (first.slots == np.arange(len(first.slots))).all()
        logits = self.target.prefill(
            first.input_ids, first.prompt_lens, scores, first.inputs_embeds,
            None if all_leading else first.slots_dev, first.prompt_lens_host,
        )  # fmt: skip
        if groups is None:
            return logits
        return replicate_prefill(self.target.cache, logits, first.slots_dev, admission.slots_dev, groups[1],
                                 admission.input_ids.shape[1])  # fmt: skip

    def join(self, emission: Emission | None, fresh: tuple | None) -> Emission:
        """The step's emission (None: no row ran) followed by the admitted rows' first tokens; they join."""
        state = self.state
        self.step_rows = state.num_rows
        if fresh is None:
            return emission
        admission, first, fresh_forced = fresh
        state.join(admission)
        if self.thinking is not None:  # forced tokens of the step's rows (from its plan), then the new rows'
            step_forced = self.thinking.forced_counts if emission is not None else None
            parts = [step_forced] if step_forced is not None else []
            self.thinking.forced_counts = torch.cat([*parts, fresh_forced])
        return first if emission is None else join_emissions(emission, first)

    # -- update: append, cut, react, sync -----------------------------------------------------------------

    def update(self, emission: Emission) -> tuple[np.ndarray, bool]:
        """Append the step's runs, let the participants react, and copy to the host who stays.

        Returns ``(stay bool [R], done)`` (host).
        """
        state, thinking = self.state, self.thinking
        if emission is None:  # no row ran and none was admitted: the waiting ones were cancelled
            return np.zeros(0, dtype=bool), True
        probe = emission.probe
        free = probe.free(state.rows.shape[0]) if probe is not None else None  # rows whose runs were verified
        if emission.rewind is not None:  # a confident probe takes its trigger's place
            state.rewind(emission.rewind)
            if self.drafting is not None:  # drafts cached past it are stale
                self.drafting.rollback(state, state.history_lens[state.rows_long])
        emitted, counts = emission.tokens, emission.counts
        if thinking is not None and emitted.shape[1] > 1:
            counts = thinking.cut_at_markers(
                state.sequences, state.rows_long, state.ends(), emitted, counts, free
            )
        counts, finished = self.stop.cut_runs(state, emitted, counts)
        state.append(emitted, counts)
        run_counts = counts if free is None else torch.where(free, counts, 0)
        triggered = self._thinking_after_append(run_counts, probe) if thinking is not None else None
        # A forward wrote the last token and the drafts; the last token and the accepted drafts (``counts``
        # entries) stay. A prefill's first token is not in the cache yet (the rows after ``step_rows`` joined
        # from one); busy rows advanced already.
        if self.step_rows == state.num_rows:
            self.target.advance(state.rows_long, run_counts)
        elif self.step_rows:
            self.target.advance(state.rows_long[: self.step_rows], run_counts[: self.step_rows])
        if self.drafting is not None:
            self.drafting.rollback(state, state.history_lens[state.rows_long] - 1)
        last = (
            emitted[:, 0]
            if emitted.shape[1] == 1
            else emitted.gather(1, (counts.long() - 1).clamp(min=0)[:, None])[:, 0]
        )
        if probe is not None:  # a probing row feeds its answer token, not what it emitted
            last = last.index_copy(0, probe.index, probe.emission.feed)
        self.last_tokens = last
        self.outputs.record(state, emission, counts)
        leaving = self.stop.after_append(
            state, finished, emitted.shape[1] == 1, emission.scores, self.uniform
        )
        if self.consistency is None:
            return self._sync(leaving, counts, triggered, probe)
        leaving = self.consistency.leaving(state, counts, leaving)  # low-confidence rows
        return self.consistency.after_sync(state, *self._sync(leaving, counts, triggered, probe))

    def _thinking_after_append(self, run_counts: torch.Tensor, probe) -> torch.Tensor | None:
        """Thinking spans, budgets and forcing follow the appended runs; int64 ``[R]`` trigger lengths."""
        state, thinking = self.state, self.thinking
        ends = state.ends()
        thinking.after_run(state.sequences, state.rows_long, ends, state.new_tokens, run_counts)
        if not self.deer:
            return None
        triggered = thinking.run_triggers(state.sequences, state.rows_long, ends, run_counts)
        if probe is not None:  # busy rows emitted through the controller: it tracks them as plain
            index = probe.index
            hits = thinking.after_append(
                state.sequences, state.rows_long[index], state.rows_host[probe.index_host], ends[index],
                state.new_tokens[state.rows_long[index]], probe.emission,
            )  # fmt: skip
            triggered = triggered.index_copy(0, index, hits)
        return triggered

    def _sync(self, leaving, counts, triggered, probe) -> tuple[np.ndarray, bool]:
        """The step's one device-to-host copy, and what the host-side participants learn from it."""
        state, thinking, stop = self.state, self.thinking, self.stop
        parts = [leaving]
        if self.compression is not None or self.drafting is not None:
            parts.append(counts)
        if self.deer:
            parts += [triggered, thinking.confident[state.rows_long]]
        if thinking is not None:
            parts.append(thinking.forcing_next(state.rows_long))
        if not stop.rows_leave:
            parts.append(stop.unfinished[state.rows_long])
        if len(parts) == 1:
            leaving_host = leaving.cpu().numpy()  # the step's one sync
            done = bool(leaving_host.all()) or self._all_full()
            return ~leaving_host, done and not state.waiting
        synced = iter(torch.stack([part.long() for part in parts]).cpu().numpy())  # the step's one sync
        leaving_host = next(synced).astype(bool)
        kept_host = next(synced) if self.compression is not None or self.drafting is not None else None
        if self.drafting is not None:
            self.drafting.after_sync(int(kept_host.sum()), len(kept_host))
            if self.thinking is None and self.compression is None and self.step_rows:
                # The step's rows kept ``kept`` of the ``planned_cols`` entries their bounds counted (rejected
                # drafts are rolled back): the bounds stay exact instead of drifting by the rejected drafts,
                # which would make the torch attention read them as padding.
                step = self.step_rows
                self.bounds[state.rows_host[:step]] += kept_host[:step] - self.planned_cols
        decided = None
        if self.deer:
            self.triggered_host, confident_host = next(synced), next(synced).astype(bool)
            is_decided = np.zeros(len(state.rows_host), dtype=bool)
            if probe is not None:
                is_decided[probe.index_host] = probe.decided_host
                if kept_host is not None:
                    kept_host[probe.index_host] = probe.q_host  # a busy row keeps all it fed
            decided = (state.rows_host[is_decided], confident_host[is_decided])
            thinking.probes_decided(*decided)
        if thinking is not None:
            self.any_forcing = bool(next(synced).any())
        if self.compression is not None:  # (rows fresh from a prefill have their prompts' lengths already)
            step = self.step_rows
            self.compression.after_sync(state.rows_host[:step], kept_host[:step], step == 0, decided)
        done = bool(leaving_host.all()) or self._all_full()
        if not stop.rows_leave:
            done = done or stop.all_done(next(synced))
        return ~leaving_host, done and not state.waiting

    def _all_full(self) -> bool:
        """Rows that advance together (one token a step) all reach ``max_new_tokens`` at once: known here."""
        return self.uniform and self.state.width_bound >= self.state.max_new

    def shrink(self, stay: np.ndarray) -> None:
        """Finished rows leave the batch (nothing is copied; their slots keep their KV until reused)."""
        if stay.all():
            return
        keep, slots, requests = self.state.shrink(stay)
        self.rows_stats.leave(slots, requests)
        self.last_tokens = self.last_tokens.index_select(0, keep)
        if self.triggered_host is not None:
            self.triggered_host = self.triggered_host[stay]

    # -- plan and forward ----------------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """Each row's inputs for the next forward: its last token, then drafts, forced text or a probe."""
        state, thinking, compression = self.state, self.thinking, self.compression
        rows = state.rows_long
        if compression is not None:  # rows at their KV limit, before the forward (never a probing row)
            compression.before_forward(state.rows_host)
        probe = None
        if self.deer:
            thinking.start_probes(state.rows_host, self.triggered_host)
            if compression is not None:
                compression.start_probes(state.rows_host)
            probe = thinking.busy_rows(state.rows_host)
        cap = forced = None
        if thinking is not None:  # budget caps on drafts; rows out of budget feed their forced text
            room = state.max_new - state.new_tokens[rows]
            if compression is not None:
                room = torch.minimum(room, compression.room(rows).long())
            if self.one_token:
                room = room.clamp(max=1)
            free = probe.free(rows.shape[0]) if probe is not None else None
            cap, *forced = thinking.limits(rows, room, free)
        if compression is not None:  # a row's forward never takes it past its KV limit
            kv_cap = compression.room(rows) - 1
            cap = kv_cap if cap is None else torch.minimum(cap, kv_cap)
        drafts = draft_lens = draft_probs = None
        if self.drafting is not None:
            all_may_pause = compression is None and thinking is None
            kv_bound = int(self.bounds[state.rows_host].max())
            drafts, draft_lens, draft_probs = self.drafting.propose(state, cap, kv_bound, all_may_pause)
        proposed = (drafts, draft_lens) if drafts is not None else None
        last = self.last_tokens
        if thinking is not None and (self.any_forcing or drafts is not None):
            drafts, draft_lens = thinking.overlay(drafts, draft_lens, *forced)
        if probe is not None:  # busy rows feed their probe inputs in the same forward
            last, drafts, draft_lens = thinking.overlay_probes(
                probe, last, *self._no_drafts(drafts, draft_lens), rows, state.rows_host, self.target.cache,
                state.sequences, state.ends(),
            )  # fmt: skip
        num_cols = 1 + int(draft_lens.max()) if drafts is not None else 1  # (a host copy when drafting)
        return self._inputs(last, drafts, draft_lens, draft_probs, num_cols, proposed, forced, probe)

    def _no_drafts(self, drafts, draft_lens):
        if drafts is not None:
            return drafts, draft_lens
        rows = self.state.rows.shape[0]
        device = self.state.device
        return torch.zeros(rows, 1, dtype=torch.long, device=device), torch.zeros(
            rows, dtype=torch.int32, device=device
        )

    def _inputs(self, last, drafts, draft_lens, draft_probs, num_cols, proposed, forced, probe) -> StepPlan:
        """Right-aligned ``[R, num_cols]`` tokens and positions, attention-score buffers and KV bound."""
        state = self.state
        positions = self.target.cache.positions[state.rows_long]
        if num_cols == 1:
            ones = state.ones[: state.rows.shape[0]]
            plan = StepPlan(last[:, None], positions[:, None], ones, forced=forced, probe=probe)
        else:
            columns = torch.arange(num_cols, device=state.device)
            start = num_cols - 1 - draft_lens.long()  # column of the last token
            offset = columns[None, :] - start[:, None]  # 0 = last token, i = draft i
            tokens = last[:, None].expand(-1, num_cols)
            draft_index = (offset - 1).clamp(0, drafts.shape[1] - 1)
            tokens = torch.where(offset >= 1, drafts.gather(1, draft_index), tokens).masked_fill(
                offset < 0, 0
            )
            plan = StepPlan(
                tokens, (positions[:, None] + offset).clamp(min=0), (1 + draft_lens).to(torch.int32),
                drafts, draft_lens, draft_probs, proposed, forced, probe,
            )  # fmt: skip
        if self.compression is not None:
            plan.scores, plan.kv_bound = self.compression.step_scores(
                state.rows_host, num_cols, num_cols == 1
            )
        self.bounds[state.rows_host] += num_cols  # as if every column stays; _sync corrects it
        self.planned_cols = num_cols
        if self.compression is None:
            plan.kv_bound = int(self.bounds[state.rows_host].max())
        return plan

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """The target forward of ``plan``: last-column logits ``[R, V]`` when every row that is not probing
        feeds one token, else every column's ``[R, T, V]``."""
        state = self.state
        plan.last_only = (
            plan.num_cols == 1 or plan.proposed is None and (self.one_token or not self.any_forcing)
        )
        logits = self.target.forward(
            state.rows, plan.input_ids, plan.positions, plan.q_lens, plan.kv_bound, state.leading,
            plan.scores, plan.last_only, self.choose_in_graph, slot_span=state.slot_span,
            host_rows=(state.rows_host, self.bounds[state.rows_host]), sampling=self.sampling_in_graph,
        )  # fmt: skip
        plan.chosen, plan.chosen_scores = self.target.chosen, self.target.chosen_scores
        state.forwards += 1
        return logits

    # -- accept --------------------------------------------------------------------------------------------

    def accept(self, plan: StepPlan, logits: torch.Tensor) -> Emission:
        """Each row's run: its chosen token (one-token steps), or its accepted drafts and the target's."""
        state, thinking, probe = self.state, self.thinking, plan.probe
        history = state.history_for_processors() if self.pipeline.needs_history else None
        if probe is not None:  # busy rows choose from their last column, through the controller
            probe_logits = logits[probe.index] if plan.last_only else logits[probe.index, -1]
            thinking.probe_choose(
                probe, probe_logits, state.rows_long, state.rows_host, state.new_tokens, self.target.cache,
                self.pipeline, history,
            )  # fmt: skip
        if plan.chosen is not None:  # the compiled step's argmax or draw is exactly process + choose here
            ones = state.ones[: logits.shape[0]]
            scores = plan.chosen_scores if plan.chosen_scores is not None else logits.float()
            emission = Emission(plan.chosen[:, None], ones, scores=scores, logits=logits)
        elif plan.last_only:
            emission = self._choose_one(logits, history)
        else:
            emission = Emission(*self._verify(plan, logits))
        if thinking is not None:
            emission.tokens, emission.counts = thinking.apply_forced(
                emission.tokens, emission.counts, *plan.forced
            )
        if plan.proposed is not None:
            self.drafting.after_accept(state, emission.tokens, emission.counts, *plan.proposed)
        if probe is not None:
            emission.tokens, emission.counts, emission.rewind = thinking.merge_probes(
                probe, emission.tokens, emission.counts
            )
            emission.probe = probe
        if self.consistency is not None:
            self.consistency.observe(logits, plan.q_lens, emission.tokens)
        return emission

    def _choose_one(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        requests: torch.Tensor | None = None,
    ) -> Emission:
        """One token per row from last-column logits ``[R, V]`` (processors, warpers, greedy or a draw).

        ``rows`` / ``requests`` (int64 ``[R]``): the slots and request rows of the logits (default: the
        active rows; given: rows fresh from their prefill).
        """
        state = self.state
        admitted = rows is not None
        if rows is None:
            rows, requests = state.rows_long, state.requests_long
        if history is None and self.pipeline.needs_history:
            history = state.history_for_processors(rows)
        user_views = None
        if self.request.logits_processors:  # transformers' view: the whole batch, row i always request i
            user_views = user_views_by_length(state, rows, requests, fresh=admitted)
        scores = self.pipeline.process(logits, history, state.new_tokens[rows], user_views, rows=rows)
        tokens = self.pipeline.choose(scores, rows)
        counts = state.ones[: tokens.shape[0]]
        return Emission(tokens[:, None], counts, scores=scores, logits=logits)

    def _verify(self, plan: StepPlan, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(emitted [R, T], counts [R])``: the accepted drafts and the target's token after them."""
        state, pipeline = self.state, self.pipeline
        rows = state.rows_long
        num_cols = plan.num_cols
        scores = pipeline.process_columns(logits, state.new_tokens[rows], num_cols - plan.q_lens)
        not_finished = torch.zeros(rows.shape[0], dtype=torch.bool, device=state.device)
        backend = self.request.decode_config.attn_backend
        if not self.request.do_sample:
            counts, emitted, _ = verify_greedy(
                scores, plan.input_ids, plan.q_lens, not_finished, pipeline.eos_ids, backend=backend
            )
            return emitted, counts
        aligned = None
        if plan.draft_probs is not None:  # [R, k, V] -> the verify layout [R, T, V] (column of draft i - 1)
            start = num_cols - 1 - plan.draft_lens.long()
            index = torch.arange(num_cols, device=state.device)[None, :] - start[:, None]
            index = index.clamp(0, plan.draft_probs.shape[1] - 1)
            aligned = plan.draft_probs.gather(1, index[:, :, None].expand(-1, -1, plan.draft_probs.shape[2]))
        counts, emitted, _ = verify_sampling(
            scores.softmax(dim=-1), aligned, plan.input_ids, plan.q_lens, not_finished, pipeline.eos_ids,
            self.seeds[rows], self.offsets[rows], backend=backend,
        )  # fmt: skip
        self.offsets[rows] += philox_offset_increment(num_cols, scores.shape[-1])
        return emitted, counts

    # -- finish --------------------------------------------------------------------------------------------

    def finish(self, started: float) -> torch.Tensor | EffdecodeGenerateOutput:
        """The HF-format result: sequences (with ``return_dict_in_generate``: scores/logits, stats)."""
        state, stats = self.state, self.stats
        self.outputs.end()
        if state.num_rows:  # the rows still running finish with the call
            state.harvest(state.rows_host, state.requests_host)
            self.rows_stats.leave(state.rows_host, state.requests_host)
        if self.consistency is not None:
            stats.consistency = self.consistency.finish(state, state.max_new)
        if state.waiting and self.request.on_rows_finished is not None:  # max_time ended the call first
            waiting = state.waiting_requests().astype(np.int64)
            self.request.on_rows_finished(waiting, np.zeros(len(waiting), np.int64))
        sequences = state.result()
        stats.target_forwards = state.forwards
        stats.new_tokens = state.out_new_tokens.tolist()
        stats.target_row_forwards = state.row_forwards.tolist()
        if self.drafting is not None:
            stats.draft_forwards = self.drafting.forwards
        if self.compression is not None:
            self.compression.finish(stats)
        self.rows_stats.fill(stats)
        stats.wall_time_s = time.perf_counter() - started
        graphs = self.target.graphs
        if graphs is not None:
            stats.compile_time_s = graphs.compile_time_s - self.compile_before
        if not self.request.return_dict_in_generate:
            return sequences
        outputs = self.outputs
        output = EffdecodeGenerateOutput(
            sequences=sequences,
            scores=as_normal_tensors(outputs.scores) if self.request.output_scores else None,
            logits=as_normal_tensors(outputs.logits) if self.request.output_logits else None,
            stats=stats,
        )
        if state.reused or state.num_slots < state.batch_size:
            return output  # rows that left gave their slots away: no transformers cache to return
        target = self.target  # transformers' cache, built from the slot cache when first read
        batch_size = sequences.shape[0]
        return output.attach_cache(
            LazyHFCache(
                target.cache,
                torch.arange(batch_size, device=sequences.device),
                self.request.prompt_lens,
                state.out_new_tokens,
                state.prompt_width,
                sequences.shape[1] - 1,
                target.model.config,
                persistent=target.graphs is not None,
            )
        )
