"""One call of the decode loop (:mod:`effdecode.generation.loop`): its participants and the phases of a step.

Each phase is a method that calls the participants' hooks in a fixed order; the participants own their state.
"""

from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import torch

from effdecode.compression.kv_compressor import KVCompressor
from effdecode.distributed import agree_any, tp_group
from effdecode.generation.compiled import chooses_in_graph
from effdecode.generation.compressing import Compression
from effdecode.generation.consistency import Consistency
from effdecode.generation.drafting import Drafting
from effdecode.generation.graphs import decode_cache
from effdecode.generation.logits import LogitsPipeline
from effdecode.generation.output import EffdecodeGenerateOutput, LazyHFCache, as_normal_tensors
from effdecode.generation.outputs import StepOutputs
from effdecode.generation.request import GenerationRequest
from effdecode.generation.shared_prefill import prefill_draft, prefill_once, sharing_factor
from effdecode.generation.state import DecodeState, Emission, StepPlan
from effdecode.generation.stopping import StopLogic
from effdecode.generation.target import TargetModel
from effdecode.generation.thinking import ThinkingController
from effdecode.generation.user_hooks import live_view
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
        config = request.decode_config
        batch_size = request.input_ids.shape[0]
        max_prompt = int(request.prompt_lens.max())
        thinking = None
        if request.thinking is not None:
            vocab_size = model.get_output_embeddings().weight.shape[0]
            thinking = ThinkingController(
                request.thinking, request.input_ids, request.prompt_lens, vocab_size
            )
        self.thinking = thinking
        self.deer = thinking is not None and thinking.plan.early_exit
        # A probe holds [probe text, answer tokens] past the row's entries until it is decided.
        probe_room = thinking.probe_width + thinking.plan.answer_tokens if self.deer else 0
        speculation = request.speculation
        forced = len(request.thinking.forced_ids) if thinking is not None else 0
        # Columns a step may write past a row's end: drafts, forced text or a probe, and one more.
        lookahead = 0
        if speculation is not None or thinking is not None:
            lookahead = 1 + max(speculation.num_draft if speculation else 0, forced, probe_room)
        needed = max_prompt + request.max_new_tokens + lookahead
        capacity = needed
        if config.compresses:  # a row's inputs stop at its KV limit: no room past it but a probe's
            capacity = KVCompressor.capacity_for(config, max_prompt, needed) + probe_room
        cache, graphs = decode_cache(model, config, batch_size, capacity)
        self.target = TargetModel(model, cache, graphs, config.attn_backend)
        self.compile_before = graphs.compile_time_s if graphs is not None else 0.0
        # Greedy with nothing between the forward and the argmax: a compiled step chooses the tokens itself.
        self.choose_in_graph = config.compile and thinking is None and chooses_in_graph(request)
        self.compression = (
            Compression(config, cache, request.prompt_lens, thinking) if config.compresses else None
        )
        self.pipeline = LogitsPipeline(request, model.device)
        tensor_parallel = tp_group(model) is not None
        self.drafting = (
            Drafting(request, capacity, timed_gate=not (request.do_sample or tensor_parallel))
            if speculation is not None
            else None
        )
        agree = functools.partial(agree_any, model) if tensor_parallel else None
        self.stop = StopLogic(request, self.pipeline.eos_ids, started, agree)
        # Self-consistency (answers, votes, early stop of a prompt's rows): effdecode.generation.consistency.
        self.consistency = Consistency(request, self.pipeline.eos_ids) if config.answer is not None else None
        self.share = sharing_factor(request, config.compresses)  # rows per shared prefill
        self.outputs = StepOutputs(request)
        self.state = DecodeState(request, lookahead, keep_history=speculation is not None)
        # Options that need one token per step (they exclude drafting): forced text goes one token a step.
        self.one_token = (
            self.pipeline.needs_history
            or request.output_scores
            or request.output_logits
            or (request.streamer is not None and batch_size > 1)
            or not self.stop.rows_leave
        )
        # Every row emits one token a step (no drafts, no thinking control): the host knows their counts.
        self.uniform = speculation is None and thinking is None
        # Per-row streams of the verify sampler (drafts, and forced thinking text fed as drafts).
        if request.do_sample and (speculation is not None or thinking is not None):
            self.seeds = torch.randint(0, 2**62, (batch_size,), device=model.device)
            self.offsets = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        nbytes = cache.nbytes + sum(p.nbytes for p in (self.drafting, self.compression) if p is not None)
        self.stats = GenerationStats(kv_peak_bytes=nbytes)
        self.kv_bound = max_prompt  # host bound of the rows' cache lengths
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
        """All prompts in one forward; the first token of every row."""
        request, state = self.request, self.state
        self.outputs.start()
        scores = None
        if self.compression is not None:
            scores = self.compression.prefill_scores(state.rows_host, request.prompt_lens.cpu().numpy())
        logits = prefill_once(
            lambda ids, lens, embeds: self.target.prefill(ids, lens, scores, embeds), self.target.cache,
            request.input_ids, request.prompt_lens, self.share, request.inputs_embeds,
        )  # fmt: skip
        state.forwards = 1
        if self.drafting is not None:
            prefill_draft(self.drafting, request.input_ids, request.prompt_lens, self.share)
        emission = self._choose_one(logits)
        if self.consistency is not None:
            self.consistency.observe(logits, None, emission.tokens)
        if self.thinking is not None:  # (a thinking budget of 0 forces the first token already)
            _, forced, forced_counts = self.thinking.limits(state.rows_long, emission.counts.long())
            emission.tokens, emission.counts = self.thinking.apply_forced(
                emission.tokens, emission.counts, forced, forced_counts
            )
        return emission

    # -- update: append, cut, react, sync -----------------------------------------------------------------

    def update(self, emission: Emission) -> tuple[np.ndarray, bool]:
        """Append the step's runs, let the participants react, and copy to the host who stays.

        Returns ``(stay bool [R], done)`` (host).
        """
        state, thinking = self.state, self.thinking
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
        # entries) stay. The prefill's first token is not in the cache yet; busy rows advanced already.
        if state.forwards > 1:
            self.target.advance(state.rows_long, run_counts)
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
            return ~leaving_host, bool(leaving_host.all()) or self._all_full()
        synced = iter(torch.stack([part.long() for part in parts]).cpu().numpy())  # the step's one sync
        leaving_host = next(synced).astype(bool)
        kept_host = next(synced) if self.compression is not None or self.drafting is not None else None
        if self.drafting is not None:
            self.drafting.after_sync(int(kept_host.sum()), len(kept_host))
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
        if self.compression is not None:
            self.compression.after_sync(state.rows_host, kept_host, state.forwards == 1, decided)
        done = bool(leaving_host.all()) or self._all_full()
        if not stop.rows_leave:
            done = done or stop.all_done(next(synced))
        return ~leaving_host, done

    def _all_full(self) -> bool:
        """Rows that advance together (one token a step) all reach ``max_new_tokens`` at once: known here."""
        return self.uniform and self.state.width_bound >= self.state.max_new

    def shrink(self, stay: np.ndarray) -> None:
        """Finished rows leave the batch (nothing is copied; their slots keep their KV)."""
        if stay.all():
            return
        keep = self.state.shrink(stay)
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
            drafts, draft_lens, draft_probs = self.drafting.propose(state, cap, self.kv_bound, all_may_pause)
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
        else:
            plan.kv_bound = self.kv_bound + num_cols
        self.kv_bound += num_cols
        return plan

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """The target forward of ``plan``: last-column logits ``[R, V]`` when every row that is not probing
        feeds one token, else every column's ``[R, T, V]``."""
        state = self.state
        plan.last_only = (
            plan.num_cols == 1 or plan.proposed is None and (self.one_token or not self.any_forcing)
        )
        logits = self.target.forward(
            state.rows, plan.input_ids, plan.positions, plan.q_lens, plan.kv_bound,
            state.rows.shape[0] == state.batch_size, plan.scores, plan.last_only, self.choose_in_graph,
        )  # fmt: skip
        plan.chosen = self.target.chosen
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
        if plan.chosen is not None:  # the compiled step's argmax is exactly process + choose here
            ones = state.ones[: logits.shape[0]]
            emission = Emission(plan.chosen[:, None], ones, scores=logits.float(), logits=logits)
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

    def _choose_one(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> Emission:
        """One token per row from last-column logits ``[R, V]`` (processors, warpers, greedy or a draw)."""
        state = self.state
        if history is None and self.pipeline.needs_history:
            history = state.history_for_processors()
        user_view = None
        if self.request.logits_processors:  # transformers' view: the whole batch, row i always row i
            width = state.prompt_width + min(state.width_bound, state.max_new)
            user_view = (live_view(state, width), state.rows_long)
        scores = self.pipeline.process(
            logits, history, state.new_tokens[state.rows_long], user_view, rows=state.rows_long
        )
        tokens = self.pipeline.choose(scores, state.rows_long)
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
        if self.consistency is not None:
            stats.consistency = self.consistency.finish(state, state.max_new)
        sequences = state.result()
        stats.target_forwards = state.forwards
        stats.new_tokens = state.new_tokens.tolist()
        stats.target_row_forwards = state.row_forwards.tolist()
        if self.drafting is not None:
            stats.draft_forwards = self.drafting.forwards
            stats.proposed_draft_tokens = self.drafting.proposed.tolist()
            stats.accepted_draft_tokens = self.drafting.accepted.tolist()
        if self.compression is not None:
            self.compression.finish(stats)
        else:
            stats.kv_peak_tokens = int(self.target.cache.cache_lens.max())
        if self.thinking is not None:
            stats.thinking_tokens = self.thinking.thinking_tokens()
            stats.early_exits = self.thinking.early_exits.tolist()
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
        target = self.target  # transformers' cache, built from the slot cache when first read
        batch_size = sequences.shape[0]
        return output.attach_cache(
            LazyHFCache(
                target.cache,
                torch.arange(batch_size, device=sequences.device),
                self.request.prompt_lens,
                state.new_tokens,
                state.prompt_width,
                sequences.shape[1] - 1,
                target.model.config,
                persistent=target.graphs is not None,
            )
        )
