"""Batched speculative decoding: every row drafts, one target forward verifies all rows, each row accepts its
own number of tokens.

One step: propose (n-gram lookup in the row's own history, or a draft model with its own slot cache) ->
verify (one target forward over the last token and the drafts, right-aligned, ``q_len = 1 + drafts``) ->
accept (greedy: drafts up to the first disagreement with the target's argmax, then the target's token;
sampling: lossless rejection sampling) -> update (append; cut at EOS, stop criteria, max_new_tokens) ->
roll back (cache lengths count only accepted entries: rejected ones are never attended and get overwritten).
Thinking budgets, spans and DEER probes ride along (:mod:`effdecode.generation.speculative_thinking`: probing
rows feed their probe inputs in the verify forward instead of drafts); with eviction, a verify forward's
attention scores count the kept tokens only (:meth:`KVCompressor.commit_scores`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch

from effdecode.compression.kv_compressor import KVCompressor
from effdecode.generation.drafters import DraftSchedule, ModelDrafter, NgramDrafter, propose_for_some
from effdecode.generation.graphs import decode_cache
from effdecode.generation.logits import LogitsPipeline
from effdecode.generation.output import EffdecodeGenerateOutput
from effdecode.generation.request import GenerationRequest
from effdecode.generation.speculative_thinking import ProbeRows, SpeculativeThinking
from effdecode.generation.steps import criteria_hit, forward_logits, prefill, right_aligned_windows
from effdecode.generation.thinking import ThinkingController
from effdecode.hf_attention import routed_through_effdecode
from effdecode.ops.attention import SlotBatch
from effdecode.ops.sampling import warp_logits
from effdecode.ops.verify import philox_offset_increment, verify_greedy, verify_sampling
from effdecode.stats import GenerationStats


def run_speculative(
    model: torch.nn.Module, request: GenerationRequest
) -> torch.Tensor | EffdecodeGenerateOutput:
    """Speculative decoding of ``request``; returns what :func:`run_generation` would, with draft stats."""
    started = time.perf_counter()
    plan = request.speculation
    device = model.device
    input_ids = request.input_ids
    batch_size, prompt_width = input_ids.shape
    max_prompt = int(request.prompt_lens.max())
    thinking = None
    if request.thinking is not None:
        vocab_size = model.get_output_embeddings().weight.shape[0]
        thinking = SpeculativeThinking(
            ThinkingController(request.thinking, input_ids, request.prompt_lens, vocab_size)
        )
    controller = thinking.controller if thinking is not None else None
    deer = controller is not None and controller.plan.early_exit
    # A probe holds [probe text, answer tokens] past the row's entries until it is decided; a confident one
    # commits the probe text and a token at once.
    probe_room = controller.probe_width + controller.plan.answer_tokens if deer else 0
    # Columns a step may write past a row's end: the drafts (or a forced text fed as drafts) and one more.
    lookahead = 1 + max(
        plan.num_draft, len(request.thinking.forced_ids) if thinking is not None else 0, probe_room
    )
    capacity = max_prompt + request.max_new_tokens + lookahead
    config = request.decode_config
    # With eviction a row's drafts stop at its KV limit: the target cache needs no room past it but a probe's.
    target_capacity = (
        KVCompressor.capacity_for(config, max_prompt, capacity) + probe_room
        if config.compresses
        else capacity
    )
    cache, graphs = decode_cache(model, config, batch_size, target_capacity)
    compile_before = graphs.compile_time_s if graphs is not None else 0.0
    compressor = (
        KVCompressor(
            config, cache, request.prompt_lens, (lambda: thinking.controller.spans) if thinking else None
        )
        if config.compresses
        else None
    )
    backend = config.attn_backend
    pipeline = LogitsPipeline(request, device)
    eos_ids = pipeline.eos_ids
    pad = request.pad_token_id if request.pad_token_id is not None else 0
    width = prompt_width + request.max_new_tokens
    sequences = torch.full((batch_size, width + lookahead), pad, dtype=torch.long, device=device)
    sequences[:, :prompt_width] = input_ids
    # Left-aligned histories (prompt without padding, then new tokens) for n-gram lookup and the draft model.
    history = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
    prompt_lens = request.prompt_lens
    columns = torch.arange(prompt_width, device=device)
    source = (columns[None, :] + (prompt_width - prompt_lens.long())[:, None]).clamp(max=prompt_width - 1)
    history[:, :prompt_width] = input_ids.gather(1, source)
    history_lens = prompt_lens.clone()
    new_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
    schedule = DraftSchedule(plan, batch_size, device)
    row_forwards = torch.zeros(batch_size, dtype=torch.long, device=device)  # set when a row leaves
    proposed_total = torch.zeros(batch_size, dtype=torch.long, device=device)
    accepted_total = torch.zeros(batch_size, dtype=torch.long, device=device)
    if plan.assistant_model is not None:
        # The draft cache obeys the target's KV budget too, with streaming eviction whatever the target's
        # policy: drafts never change the output, so the cheapest policy will do (and no attention scores).
        eviction = None
        if config.compresses:
            eviction = dataclasses.replace(config, kv_policy="streaming", kv_think_only=False)
        drafter = ModelDrafter(
            plan.assistant_model, batch_size, target_capacity, backend, eviction, request.prompt_lens
        )
    else:
        drafter = NgramDrafter(plan, backend)
    sampling = request.do_sample
    if sampling:
        seeds = torch.randint(0, 2**62, (batch_size,), device=device)  # from torch's seeded generator
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)

    def choose_draft(logits: torch.Tensor):
        if not sampling:
            return logits.argmax(dim=-1), None
        distribution = warp_logits(logits.float(), request.sampling).softmax(dim=-1)
        return torch.multinomial(distribution, 1).squeeze(1), distribution

    stats = GenerationStats(
        kv_peak_bytes=cache.nbytes + drafter.nbytes + (compressor.nbytes if compressor is not None else 0)
    )
    streamer = request.streamer
    if streamer is not None:
        streamer.put(input_ids.cpu())

    draft_model = plan.assistant_model
    draft_routing = (
        routed_through_effdecode(draft_model) if draft_model is not None else contextlib.nullcontext()
    )
    with routed_through_effdecode(model), draft_routing, torch.inference_mode():
        rows_host = np.arange(batch_size)
        prefill_scores = (
            compressor.scores_for(rows_host, prompt_lens.cpu().numpy()) if compressor is not None else None
        )
        logits = prefill(model, cache, input_ids, prompt_lens, backend, prefill_scores)
        drafter.prefill(input_ids, prompt_lens)
        stats.target_forwards = 1
        scores = pipeline.process(logits, None, new_tokens)
        first = pipeline.choose(scores, torch.arange(batch_size, device=device))
        num_emitted = torch.ones(batch_size, dtype=torch.int32, device=device)
        emitted = first[:, None]
        finished = torch.isin(first, eos_ids) | (request.max_new_tokens <= 1)
        rows = torch.arange(batch_size, dtype=torch.int32, device=device)
        if thinking is not None:  # (a thinking budget of 0 forces the first token already)
            _, forced, forced_counts = thinking.limits(rows.long(), num_emitted.long())
            emitted, num_emitted, finished = thinking.apply_forced(
                emitted, num_emitted, finished, forced, forced_counts
            )
        kv_bound = max_prompt
        step_cols = 1
        max_new_bound = 0  # host-side upper bound of max(new_tokens)
        quiet_until = 0  # no row drafts before this schedule step
        probe = None  # rows of the last forward busy with a probe (early exit)
        rewind = None  # tokens confident probes take back from their rows' ends (replacing their trigger)
        # Eviction scores of probing slots, restored when a probe is rolled back.
        probe_scores: dict[int, torch.Tensor] = {}

        while True:
            rows_long = rows.long()
            free = probe.free(rows.shape[0]) if probe is not None else None  # rows whose runs were verified
            if rewind is not None:  # a confident probe takes its trigger's place
                new_tokens[rows_long] -= rewind
                history_lens[rows_long] -= rewind.to(history_lens.dtype)
                drafter.rollback(rows_long, history_lens[rows_long])  # drafts cached past it are stale
            # Append this step's tokens, then cut runs after a thinking marker and at a stop criterion hit.
            if thinking is not None and emitted.shape[1] > 1:
                ends = prompt_width + new_tokens[rows_long] - 1
                cut = thinking.cut_at_markers(sequences, rows_long, ends, emitted, num_emitted, free)
                finished = finished & (cut == num_emitted)  # an EOS past the cut was not emitted
                num_emitted = cut
            if request.stopping_criteria:
                cut, stopped = _cut_at_criteria(
                    request,
                    sequences,
                    rows_long,
                    new_tokens,
                    emitted,
                    num_emitted,
                    finished,
                    prompt_width + max_new_bound + step_cols,
                    pad,
                    prompt_width,
                )
                if free is not None:  # a probe's emission is checked whole, after its last token (plain loop)
                    stopped = torch.where(free, stopped, finished | (stopped & (cut == num_emitted)))
                    cut = torch.where(free, cut, num_emitted)
                num_emitted, finished = cut, stopped
            _append(
                sequences,
                history,
                rows_long,
                prompt_width + new_tokens[rows_long],
                history_lens,
                emitted,
                num_emitted,
            )
            new_tokens[rows_long] += num_emitted.long()
            history_lens[rows_long] += num_emitted
            run_counts = num_emitted if free is None else torch.where(free, num_emitted, 0)
            if thinking is not None:
                ends = prompt_width + new_tokens[rows_long] - 1
                thinking.after_run(sequences, rows_long, ends, new_tokens, run_counts)
            triggered = None
            if deer:
                triggered = thinking.run_triggers(sequences, rows_long, ends, run_counts)
                if probe is not None:  # busy rows emitted through the controller: it tracks them as plain
                    index = probe.index
                    hits = controller.after_append(
                        sequences, rows_long[index], rows_host[probe.index_host], ends[index],
                        new_tokens[rows_long[index]], probe.emission,
                    )  # fmt: skip
                    triggered = triggered.index_copy(0, index, hits)
            # A verify forward wrote the last token and the drafts; the last token and the accepted drafts,
            # num_emitted entries, stay. The prefill's first token is not in the cache yet. Busy rows
            # advanced by what they fed already.
            if stats.target_forwards > 1:
                cache.cache_lens.index_add_(0, rows_long, run_counts)
                cache.positions.index_add_(0, rows_long, run_counts.long())
            drafter.rollback(rows_long, history_lens[rows_long] - 1)
            last_tokens = (
                emitted[:, 0]
                if emitted.shape[1] == 1
                else emitted.gather(1, (num_emitted.long() - 1).clamp(min=0)[:, None]).squeeze(1)
            )
            if probe is not None:  # a probing row feeds its answer token, not what it emitted
                last_tokens = last_tokens.index_copy(0, probe.index, probe.emission.feed)
            max_new_bound += step_cols
            if streamer is not None:
                streamer.put(emitted[0, : int(num_emitted[0])].cpu())

            finished = finished | (new_tokens[rows_long] >= request.max_new_tokens)
            out_of_time = request.max_time is not None and time.perf_counter() - started > request.max_time
            if compressor is None and not deer:
                finished_host = finished.cpu().numpy()  # the step's sync: which rows stay
            else:
                parts = [finished.long(), num_emitted.long()]
                if deer:
                    parts += [triggered, controller.confident[rows_long].long()]
                synced = torch.stack(parts).cpu().numpy()  # the step's sync
                finished_host = synced[0].astype(bool)
                # Entries each row kept: its run's, or all a busy row fed.
                kept_host = synced[1] if probe is None else _probe_kept(synced[1], probe)
                if deer:
                    triggered_host, confident_host = synced[2], synced[3].astype(bool)
                    decided = np.zeros(len(rows_host), dtype=bool)
                    if probe is not None:
                        decided[probe.index_host] = probe.decided_host
                    controller.probes_decided(rows_host[decided], confident_host[decided])
                if compressor is not None:
                    if compressor.has_pending_scores:  # the verify forward's kept tokens are known now
                        compressor.commit_scores(kept_host)
                    if stats.target_forwards > 1:
                        compressor.advance(rows_host, kept_host)
                    if deer:
                        _decide_probe_entries(
                            compressor, controller, rows_host[decided], confident_host[decided], probe_scores
                        )
            if bool(finished_host.all()) or out_of_time:
                row_forwards[rows_long] = stats.target_forwards
                break
            if bool(finished_host.any()):
                row_forwards[rows_long[finished]] = stats.target_forwards
                keep = torch.as_tensor(np.flatnonzero(~finished_host), device=device)
                rows, rows_long = rows.index_select(0, keep), rows_long.index_select(0, keep)
                last_tokens = last_tokens.index_select(0, keep)
                if deer:
                    triggered_host = triggered_host[~finished_host]
                rows_host = rows_host[~finished_host]
            if compressor is not None:  # rows at their KV limit, before the forward (never a probing row)
                candidates = rows_host if not deer else rows_host[controller.stage[rows_host] == 0]
                compressor.compact(compressor.due(candidates))
            probe = None
            if deer:
                _start_probes(controller, compressor, rows_host, triggered_host, probe_scores)
                probe = thinking.busy_rows(rows_host)

            # Propose: never more drafts than the row may still emit (minus the target's own token). While
            # every row is paused, the next probe step is known, so the steps before it skip this entirely.
            if thinking is not None:  # budget caps on drafts; rows out of budget feed their forced text
                room = request.max_new_tokens - new_tokens[rows_long]
                if compressor is not None:
                    room = torch.minimum(room, compressor.limit - cache.cache_lens[rows_long].long())
                free = probe.free(rows.shape[0]) if probe is not None else None
                draft_cap, forced, forced_counts = thinking.limits(rows_long, room, free)
            if schedule.steps + 1 < quiet_until:
                schedule.steps += 1
                max_draft, wanted = 0, None
            else:
                budget = (request.max_new_tokens - new_tokens[rows_long]).to(torch.int32)  # >= 1 when active
                wanted = torch.minimum(schedule.wanted(rows_long), budget - 1)
                if compressor is not None:  # a row's forward never takes it past its KV limit
                    wanted = torch.minimum(wanted, compressor.limit - 1 - cache.cache_lens[rows_long])
                if thinking is not None:
                    wanted = torch.minimum(wanted, draft_cap).clamp(min=0)  # a probe may pass the KV limit
                wanted_host = wanted.cpu().numpy()
                max_draft = int(wanted_host.max())
                if max_draft == 0 and compressor is None and thinking is None:  # (not a pause: a limit)
                    quiet_until = schedule.next_probe(rows_long)
            if max_draft == 0:
                drafts, draft_lens, draft_probs = None, None, None
            elif isinstance(drafter, ModelDrafter) and not wanted_host.all():
                # Only drafting rows run the draft model; paused rows catch up when they draft again.
                drafts, draft_lens, draft_probs = propose_for_some(
                    drafter, rows, np.flatnonzero(wanted_host), max_draft, wanted, history, history_lens,
                    kv_bound + 2, choose_draft,
                )  # fmt: skip
            else:
                drafts, draft_lens, draft_probs = drafter.propose(
                    rows, max_draft, wanted, history, history_lens, kv_bound + 2, choose_draft
                )
            stats.draft_forwards = drafter.forwards
            proposed, proposed_lens = drafts, draft_lens  # the drafter's own (statistics, schedule)
            if thinking is not None:
                drafts, draft_lens = thinking.overlay(drafts, draft_lens, forced, forced_counts)
                if probe is not None:  # busy rows feed their probe inputs in the same forward
                    ends = prompt_width + new_tokens[rows_long] - 1
                    last_tokens, drafts, draft_lens = thinking.overlay_probes(
                        probe, last_tokens, drafts, draft_lens, rows_long, rows_host, cache, sequences, ends
                    )
                step_cols = 1 + int(draft_lens.max())
            else:
                step_cols = 1 + (int(draft_lens.max()) if max_draft > 0 else 0)
            if compressor is not None:
                target_bound = int(compressor.lens[rows_host].max()) + step_cols
                # A verify forward's scores wait until its kept tokens are known (commit_scores).
                step_scores = (
                    compressor.scores_for(rows_host, 1)
                    if step_cols == 1
                    else compressor.deferred_scores_for(rows_host, step_cols)
                )
            else:
                target_bound, step_scores = kv_bound + step_cols, None

            if step_cols == 1 and probe is None:
                # No row drafts this step: a plain decode step (the lean path, no verify machinery).
                emitted, num_emitted, finished = _plain_step(
                    model,
                    cache,
                    pipeline,
                    rows,
                    rows_long,
                    last_tokens,
                    new_tokens,
                    target_bound,
                    batch_size,
                    backend,
                    step_scores,
                    graphs,
                )
            else:
                # Verify every row in one target forward: [last token, drafts...], right-aligned.
                q_lens = (1 + draft_lens).to(torch.int32)
                verify_ids, position_ids = _verify_inputs(
                    last_tokens, rows_long, drafts, draft_lens, step_cols, cache.positions
                )
                batch = SlotBatch(rows, cache.cache_lens, q_lens, kv_len_bound=target_bound, backend=backend)
                logits = None
                if graphs is not None and step_scores is None:
                    logits = graphs.run(model, rows, verify_ids, position_ids, backend, q_lens=q_lens)
                if logits is None:
                    logits = forward_logits(
                        model, cache, batch, verify_ids, position_ids, last_only=False, scores=step_scores
                    )
                if probe is not None:  # busy rows choose from their last column, as in the plain loop
                    thinking.probe_choose(
                        probe, logits[probe.index, -1], rows_long, rows_host, new_tokens, cache, pipeline
                    )
                scores = pipeline.process_columns(logits, new_tokens[rows_long], step_cols - q_lens)
                not_finished = torch.zeros(rows.shape[0], dtype=torch.bool, device=device)
                if sampling:
                    aligned = (
                        None
                        if draft_probs is None
                        else _align_draft_probs(draft_probs, draft_lens, step_cols)
                    )
                    num_emitted, emitted, finished = verify_sampling(
                        scores.softmax(dim=-1), aligned, verify_ids, q_lens, not_finished, eos_ids,
                        seeds[rows_long], offsets[rows_long], backend=backend,
                    )  # fmt: skip
                    offsets[rows_long] += philox_offset_increment(step_cols, scores.shape[-1])
                else:
                    num_emitted, emitted, finished = verify_greedy(
                        scores, verify_ids, q_lens, not_finished, eos_ids, backend=backend
                    )
            if thinking is not None:
                emitted, num_emitted, finished = thinking.apply_forced(
                    emitted, num_emitted, finished, forced, forced_counts
                )
            stats.target_forwards += 1
            kv_bound += step_cols
            if max_draft > 0:
                num_emitted = torch.minimum(num_emitted, budget)
                accepted = _accepted_drafts(emitted, num_emitted, proposed, proposed_lens)
                proposed_total[rows_long] += proposed_lens.long()
                accepted_total[rows_long] += accepted
                schedule.update(rows_long, proposed_lens, accepted.to(torch.int32))
            rewind = None
            if probe is not None:
                emitted, num_emitted, finished, rewind = thinking.merge_probes(
                    probe, emitted, num_emitted, finished, eos_ids
                )
                step_cols = max(step_cols, emitted.shape[1])

    if streamer is not None:
        streamer.end()
    if deer:
        # A committed probe may run past max_new_tokens, and a replaced trigger leaves tokens past the end.
        new_tokens.clamp_(max=request.max_new_tokens)
        columns = torch.arange(sequences.shape[1], device=device)[None, :]
        sequences.masked_fill_(columns >= prompt_width + new_tokens[:, None], pad)
    longest = int(new_tokens.max())
    stats.new_tokens = new_tokens.tolist()
    stats.proposed_draft_tokens = proposed_total.tolist()
    stats.accepted_draft_tokens = accepted_total.tolist()
    stats.target_row_forwards = row_forwards.tolist()
    stats.draft_forwards = drafter.forwards
    if compressor is not None:
        stats.kv_peak_tokens = compressor.peak
        stats.evicted_tokens = compressor.evicted.tolist()
    else:
        stats.kv_peak_tokens = int(cache.cache_lens.max())
    if thinking is not None:
        stats.thinking_tokens = thinking.controller.thinking_tokens()
        stats.early_exits = controller.early_exits.tolist()
    stats.wall_time_s = time.perf_counter() - started
    if graphs is not None:
        stats.compile_time_s = graphs.compile_time_s - compile_before
    sequences = sequences[:, : prompt_width + longest]
    if not request.return_dict_in_generate:
        return sequences
    return EffdecodeGenerateOutput(sequences=sequences, stats=stats)


def _probe_kept(kept: np.ndarray, probe: ProbeRows) -> np.ndarray:
    """``kept`` ``[B]`` (entries of each row's run) with a busy row's fed tokens in its place."""
    kept = kept.copy()
    kept[probe.index_host] = probe.q_host
    return kept


def _decide_probe_entries(
    compressor: KVCompressor,
    controller: ThinkingController,
    slots: np.ndarray,
    confident: np.ndarray,
    probe_scores: dict[int, torch.Tensor],
) -> None:
    """Decided probes of ``slots`` (bool ``confident`` each): the compressor keeps the row's entries, plus
    the probe text when confident.

    A rolled-back probe leaves no attention mass: the scores saved when it started come back.
    """
    for slot, kept_probe in zip(slots.tolist(), confident.tolist(), strict=True):
        saved = probe_scores.pop(slot, None)
        if saved is not None and not kept_probe:
            compressor.scores[:, slot] = saved
    if slots.size:
        compressor.lens[slots] = controller.base_host[slots] + controller.probe_width * confident


def _start_probes(
    controller: ThinkingController,
    compressor: KVCompressor | None,
    rows_host: np.ndarray,
    triggered_host: np.ndarray,
    probe_scores: dict[int, torch.Tensor],
) -> None:
    """Rows whose run ended at a trigger (its length in ``triggered_host`` ``[B]``, from the step's sync)
    probe; the compressor follows the cache (as in the plain loop)."""
    controller.start_probes(rows_host, triggered_host)
    if compressor is None:
        return
    if compressor.scores is not None:
        for slot in rows_host[controller.starting[rows_host]].tolist():
            probe_scores[slot] = compressor.scores[:, slot].clone()
    # A probe that replaces its trigger starts over the trigger's entries.
    compressor.lens[rows_host] -= controller.cache_rewind(rows_host)
    controller.base_host[rows_host] = np.where(
        controller.starting[rows_host], compressor.lens[rows_host], controller.base_host[rows_host]
    )


def _verify_inputs(last_token, rows, drafts, draft_lens, num_cols, positions):
    """Verify-forward tokens and positions ``[B, num_cols]``: last token then drafts, right-aligned."""
    columns = torch.arange(num_cols, device=rows.device)
    start = num_cols - 1 - draft_lens.long()  # column of the last accepted token
    offset = columns[None, :] - start[:, None]  # 0 = last token, i = draft i
    tokens = last_token[:, None].expand(-1, num_cols)
    if drafts is not None:
        draft_index = (offset - 1).clamp(0, drafts.shape[1] - 1)
        tokens = torch.where(offset >= 1, drafts.gather(1, draft_index), tokens)
    tokens = tokens.masked_fill(offset < 0, 0)
    # The last token sits at position positions[row] (cache_len == its index while nothing is evicted).
    position_ids = (positions[rows][:, None] + offset).clamp(min=0)
    return tokens, position_ids


def _align_draft_probs(draft_probs: torch.Tensor, draft_lens: torch.Tensor, num_cols: int) -> torch.Tensor:
    """``[B, k, V]`` draft distributions to the verify layout ``[B, num_cols, V]`` (column of draft i - 1)."""
    columns = torch.arange(num_cols, device=draft_probs.device)
    start = num_cols - 1 - draft_lens.long()
    index = (columns[None, :] - start[:, None]).clamp(0, draft_probs.shape[1] - 1)
    aligned = draft_probs.gather(1, index[:, :, None].expand(-1, -1, draft_probs.shape[2]))
    return aligned


def _accepted_drafts(emitted, num_emitted, drafts, draft_lens) -> torch.Tensor:
    """Leading emitted tokens that are the row's own drafts: int64 ``[B]``."""
    k = min(drafts.shape[1], emitted.shape[1])
    positions = torch.arange(k, device=drafts.device)[None, :]
    in_run = (positions < draft_lens[:, None]) & (positions < num_emitted[:, None])
    same = (emitted[:, :k] == drafts[:, :k]) & in_run
    return same.long().cumprod(dim=1).sum(dim=1)


def _append(sequences, history, rows, sequence_cols, history_lens, emitted, num_emitted) -> None:
    """Write each row's ``num_emitted`` tokens after its current end in both buffers, without a host sync.

    All ``T`` columns are written (the buffers have room past every row's end); columns past ``num_emitted``
    keep what they held.
    """
    if emitted.shape[1] == 1:  # one token per row (plain steps): every row emits exactly it
        sequences[rows, sequence_cols] = emitted[:, 0]
        history[rows, history_lens[rows].long()] = emitted[:, 0]
        return
    offsets = torch.arange(emitted.shape[1], device=emitted.device)[None, :]
    keep_new = offsets < num_emitted[:, None]
    for buffer, start in ((sequences, sequence_cols), (history, history_lens[rows].long())):
        columns = start[:, None] + offsets
        current = buffer[rows[:, None], columns]
        buffer[rows[:, None], columns] = torch.where(keep_new, emitted, current)


def _cut_at_criteria(
    request, sequences, rows, new_tokens, emitted, num_emitted, finished, width, pad, prompt_width
):
    """End each row's run at the first token after which a stopping criterion (stop string, user) holds."""
    num_emitted = num_emitted.clone()
    finished = finished.clone()
    ends = prompt_width + new_tokens[rows] - 1  # column of the row's last appended token
    pending = torch.ones_like(finished)
    # Only the active rows' used columns are copied (the buffer itself is written by _append afterwards).
    extended = sequences[:, : min(sequences.shape[1], width)].index_select(0, rows)
    local = torch.arange(rows.shape[0], device=rows.device)
    last_column = extended.shape[1] - 1
    for j in range(emitted.shape[1]):
        present = pending & (j < num_emitted)
        if not bool(present.any()):
            break
        column = (ends + 1 + j).clamp(max=last_column)
        extended[local, column] = torch.where(present, emitted[:, j], extended[local, column])
        windows = right_aligned_windows(extended, local, ends + 1 + j, width, pad)
        hit = criteria_hit(request.stopping_criteria, windows, None) & present
        num_emitted = torch.where(hit, j + 1, num_emitted)
        finished |= hit
        pending &= ~hit
    return num_emitted, finished


def _plain_step(
    model, cache, pipeline, rows, rows_long, last_token, new_tokens, kv_bound, batch_size, backend, scores,
    graphs,
):  # fmt: skip
    """One token per row from a T = 1 forward: ``(emitted [B, 1], num_emitted [B], finished [B])``.

    ``kv_bound`` bounds the rows' cache lengths after the forward; ``graphs`` (or None) replays it.
    """
    ones = torch.ones(rows.shape[0], dtype=torch.int32, device=rows.device)
    positions = cache.positions[rows_long]
    logits = None
    if graphs is not None and scores is None:
        logits = graphs.run(model, rows, last_token, positions, backend)
    if logits is None:
        batch = SlotBatch(
            rows, cache.cache_lens, ones, kv_len_bound=kv_bound, backend=backend, q_full=True,
            rows_are_leading_slots=rows.shape[0] == batch_size,  # rows only ever leave: then arange(B)
        )  # fmt: skip
        logits = forward_logits(model, cache, batch, last_token[:, None], positions[:, None], scores=scores)
    scores = pipeline.process(logits, None, new_tokens[rows_long])
    token = pipeline.choose(scores, rows_long)
    return token[:, None], ones, torch.isin(token, pipeline.eos_ids)
