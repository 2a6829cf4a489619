"""The decode loop over the slot cache.

prefill (all prompts in one forward) -> loop: forward the active rows -> process logits -> choose tokens ->
append, check stops -> finished rows leave ``rows``. A finished row's KV stays where it is and costs nothing.
One device-to-host copy per step (the finished flags) decides who stays; everything else stays on device.

Optional per-row features hook into the same loop: KV eviction (:class:`KVCompressor` compacts rows that
reach their limit before a forward) and thinking control (:class:`ThinkingController`: thinking budgets and
early-exit probes, which make rows emit zero or several tokens in a step).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from effdecode.compression.kv_compressor import KVCompressor
from effdecode.generation.compiled import chooses_in_graph
from effdecode.generation.graphs import decode_cache
from effdecode.generation.logits import LogitsPipeline
from effdecode.generation.output import EffdecodeGenerateOutput
from effdecode.generation.request import GenerationRequest
from effdecode.generation.steps import criteria_hit, forward_logits, prefill, right_aligned_windows
from effdecode.generation.thinking import ThinkingController
from effdecode.hf_attention import routed_through_effdecode
from effdecode.ops.attention import SlotBatch
from effdecode.stats import GenerationStats


def run_generation(
    model: torch.nn.Module, request: GenerationRequest
) -> torch.Tensor | EffdecodeGenerateOutput:
    """Decode ``request`` with ``model`` and return what transformers' ``generate`` would.

    Returns
    -------
    torch.Tensor or EffdecodeGenerateOutput
        int64 ``[B, T0 + steps]``: the prompts as given and the new tokens, ``pad_token_id`` after a row
        finished; or, with ``return_dict_in_generate``, that plus scores/logits and ``stats``.
    """
    started = time.perf_counter()
    device = model.device
    config = request.decode_config
    input_ids = request.input_ids
    batch_size, prompt_width = input_ids.shape
    max_prompt = int(request.prompt_lens.max())
    max_new = request.max_new_tokens
    thinking = (
        ThinkingController(
            request.thinking, input_ids, request.prompt_lens, model.get_output_embeddings().weight.shape[0]
        )
        if request.thinking is not None
        else None
    )
    # A probe holds [last token, probe text, answer tokens] past the row's entries until it is decided, and a
    # confident one commits the probe text at once.
    probe_room = thinking.probe_width + request.thinking.answer_tokens if thinking is not None else 0
    needed = max_prompt + max_new + probe_room
    capacity = (
        KVCompressor.capacity_for(config, max_prompt, needed) + probe_room if config.compresses else needed
    )
    cache, graphs = decode_cache(model, config, batch_size, capacity)
    compile_before = graphs.compile_time_s if graphs is not None else 0.0
    # Greedy with nothing between the forward and the argmax: a compiled step chooses the tokens itself.
    choose_in_graph = graphs is not None and graphs.compile and thinking is None and chooses_in_graph(request)
    compressor = (
        KVCompressor(
            config, cache, request.prompt_lens, (lambda: thinking.spans) if thinking is not None else None
        )
        if config.compresses
        else None
    )
    backend = config.attn_backend
    pipeline = LogitsPipeline(request, device)
    eos_ids = pipeline.eos_ids
    pad_token_id = request.pad_token_id if request.pad_token_id is not None else 0
    slack = probe_room + 1
    sequences = torch.full(
        (batch_size, prompt_width + max_new + slack), pad_token_id, dtype=torch.long, device=device
    )
    sequences[:, :prompt_width] = input_ids
    new_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, dtype=torch.int32, device=device)
    rows_host = np.arange(batch_size)
    row_forwards = np.ones(batch_size, dtype=np.int64)  # forwards each row joined (prefill included)
    probe_scores: dict[int, torch.Tensor] = {}  # eviction scores of probing slots, restored at the decision
    streamer = request.streamer
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    stats = GenerationStats(kv_peak_bytes=cache.nbytes + (compressor.nbytes if compressor else 0))
    if streamer is not None:
        streamer.put(input_ids.cpu())

    with routed_through_effdecode(model), torch.inference_mode():
        prompt_lens_host = request.prompt_lens.cpu().numpy()
        prefill_scores = compressor.scores_for(rows_host, prompt_lens_host) if compressor else None
        logits = prefill(model, cache, input_ids, request.prompt_lens, backend, prefill_scores)
        kv_len_bound = max_prompt
        stats.target_forwards = 1
        one_token = torch.ones(batch_size, dtype=torch.int32, device=device)
        one_position = torch.ones(batch_size, dtype=torch.long, device=device)

        # transformers pads a finished row only when it knows an EOS token; without one, a row that a
        # stopping criterion ended keeps generating until every row is done. Mirror that.
        rows_leave = eos_ids.numel() > 0
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        chosen = None  # tokens a compiled step chose with its forward
        step = 0
        width_bound = 0  # host-side upper bound of max(new_tokens)
        while True:
            rows_long = rows.long()
            history = (
                sequences[:, : prompt_width + step].index_select(0, rows_long)
                if pipeline.needs_history
                else None
            )
            if thinking is not None:
                logits = thinking.before_choose(logits, rows_long, rows_host)
            if chosen is not None:
                scores, next_tokens = logits.float(), chosen
            else:
                scores = pipeline.process(logits, history, new_tokens[rows_long])
                next_tokens = pipeline.choose(scores, rows_long)
            step += 1
            if thinking is None:
                sequences[rows_long, prompt_width + new_tokens[rows_long]] = next_tokens
                new_tokens[rows_long] += 1
                width_bound += 1
                last_tokens, emitted_any, triggered = next_tokens, None, None
            else:
                emission = thinking.after_choose(
                    next_tokens, rows_long, rows_host, new_tokens[rows_long], cache
                )
                if emission.rewind is not None:  # a confident probe takes its trigger's place
                    new_tokens[rows_long] -= emission.rewind
                _append_emission(sequences, rows_long, prompt_width + new_tokens[rows_long], emission)
                new_tokens[rows_long] += emission.counts
                width_bound += emission.tokens.shape[1]
                ends = prompt_width + new_tokens[rows_long] - 1
                triggered = thinking.after_append(
                    sequences, rows_long, rows_host, ends, new_tokens[rows_long], emission
                )
                last_tokens = emission.tokens.gather(1, (emission.counts - 1).clamp(min=0)[:, None]).squeeze(
                    1
                )
                emitted_any = emission.counts > 0
                next_tokens = emission.feed
            if request.output_scores:
                # Rows that already left get zeros (transformers would hold the finished rows' logits).
                scores_out.append(
                    scores.new_zeros(batch_size, scores.shape[-1]).index_copy_(0, rows_long, scores)
                )
            if request.output_logits:
                logits_out.append(
                    logits.new_zeros(batch_size, logits.shape[-1])
                    .float()
                    .index_copy_(0, rows_long, logits.float())
                )
            if streamer is not None:
                streamer.put(
                    torch.full((batch_size,), pad_token_id, dtype=torch.long).index_copy_(
                        0, rows_long.cpu(), last_tokens.cpu()
                    )
                )

            done = (
                torch.isin(last_tokens, eos_ids)
                if eos_ids.numel()
                else torch.zeros_like(last_tokens, dtype=torch.bool)
            )
            if emitted_any is not None:
                done &= emitted_any
            if request.stopping_criteria:
                width = prompt_width + min(width_bound, max_new)
                if thinking is None:
                    history = sequences[:, :width].index_select(0, rows_long)
                else:  # rows advance by different counts (probes): each window ends at its row's last token
                    ends = prompt_width + new_tokens[rows_long] - 1
                    history = right_aligned_windows(sequences, rows_long, ends, width, pad_token_id)
                hit = criteria_hit(request.stopping_criteria, history, scores)
                done = done | (hit & emitted_any if emitted_any is not None else hit)
            out_of_time = request.max_time is not None and time.perf_counter() - started > request.max_time
            if thinking is None:
                if step >= max_new or out_of_time:
                    break
                leaving = done if rows_leave else None
            else:
                # Rows advance by different counts here: each leaves at its own max_new_tokens.
                if out_of_time:
                    break
                full = new_tokens[rows_long] >= max_new
                leaving = (done | full) if rows_leave else full
            if thinking is not None:
                sync = (
                    torch.stack([leaving.long(), triggered, thinking.confident[rows_long].long()])
                    .cpu()
                    .numpy()
                )
                leaving_host, triggered_host, confident_host = sync[0].astype(bool), sync[1], sync[2]
                thinking.probes_decided(
                    rows_host[thinking.decided_host], confident_host[thinking.decided_host]
                )
            else:
                leaving_host = leaving.cpu().numpy() if leaving is not None else None  # the step's one sync
            if compressor is not None and thinking is not None:
                # Decided probes: the cache keeps the last token, plus the probe text when confident.
                decided = rows_host[thinking.decided_host]
                outcome = confident_host[thinking.decided_host]
                for slot, kept_probe in zip(decided.tolist(), outcome.tolist(), strict=True):
                    saved = probe_scores.pop(slot, None)
                    if saved is not None and not kept_probe:  # a rolled-back probe leaves no attention mass
                        compressor.scores[:, slot] = saved
                if decided.size:
                    compressor.lens[decided] = (
                        thinking.base_host[decided]
                        + thinking.probe_width * confident_host[thinking.decided_host]
                    )
            if not rows_leave:
                unfinished[rows_long] &= ~done
                if not bool(unfinished[rows_long].any()):
                    break
            if leaving_host is not None:
                if bool(leaving_host.all()):
                    break
                if bool(leaving_host.any()):
                    stay = ~leaving_host
                    keep = torch.as_tensor(np.flatnonzero(stay), device=device)
                    rows = rows.index_select(0, keep)
                    next_tokens = next_tokens.index_select(0, keep)
                    rows_long = rows.long()
                    rows_host = rows_host[stay]
                    if thinking is not None:
                        triggered_host = triggered_host[stay]

            # Rows that reached their KV limit are compacted before the forward (never a probing row).
            if compressor is not None:
                candidates = rows_host if thinking is None else rows_host[thinking.stage[rows_host] == 0]
                compressor.compact(compressor.due(candidates))
            num_rows = rows.shape[0]
            if thinking is not None:
                thinking.start_probes(rows_host, triggered_host)
                if compressor is not None and compressor.scores is not None:
                    for slot in rows_host[thinking.starting[rows_host]].tolist():
                        probe_scores[slot] = compressor.scores[:, slot].clone()
                if compressor is not None:
                    # A probe that replaces its trigger starts over the trigger's entries.
                    compressor.lens[rows_host] -= thinking.cache_rewind(rows_host)
                    thinking.base_host[rows_host] = np.where(
                        thinking.starting[rows_host],
                        compressor.lens[rows_host],
                        thinking.base_host[rows_host],
                    )
                ends = prompt_width + new_tokens[rows_long] - 1
                input_ids_step, q_lens, incoming = thinking.forward_inputs(
                    next_tokens, rows_long, rows_host, cache, sequences, ends
                )
            else:
                input_ids_step, q_lens, incoming = next_tokens[:, None], one_token[:num_rows], 1
            num_cols = input_ids_step.shape[1]
            if compressor is not None:
                kv_len_bound = int(compressor.lens[rows_host].max()) + num_cols
                step_scores = compressor.scores_for(rows_host, incoming)
            else:
                kv_len_bound += num_cols
                step_scores = None
            batch = SlotBatch(
                rows,
                cache.cache_lens,
                q_lens,
                kv_len_bound=min(kv_len_bound, capacity),
                backend=backend,
                rows_are_leading_slots=num_rows == batch_size,
                q_full=num_cols == 1,
            )
            positions = cache.positions.index_select(0, rows_long)[:, None]
            if num_cols > 1:
                columns = torch.arange(num_cols, device=device)[None, :]
                positions = (positions + columns - (num_cols - q_lens.long())[:, None]).clamp(min=0)
            logits = chosen = None
            if choose_in_graph and num_cols == 1 and step_scores is None:
                logits, chosen = graphs.run_and_choose(
                    model, rows, input_ids_step[:, 0], positions[:, 0], backend
                ) or (None, None)
            elif graphs is not None and num_cols == 1 and step_scores is None:
                logits = graphs.run(model, rows, input_ids_step[:, 0], positions[:, 0], backend)
            if logits is None:
                logits = forward_logits(model, cache, batch, input_ids_step, positions, scores=step_scores)
            if num_cols == 1:
                cache.cache_lens.index_add_(0, rows_long, one_token[:num_rows])
                cache.positions.index_add_(0, rows_long, one_position[:num_rows])
            else:
                cache.cache_lens.index_add_(0, rows_long, q_lens)
                cache.positions.index_add_(0, rows_long, q_lens.long())
            if compressor is not None:
                compressor.advance(rows_host, incoming)
            if thinking is not None:
                thinking.after_forward(logits, rows_long, rows_host)
            stats.target_forwards += 1
            row_forwards[rows_host] += 1

    if streamer is not None:
        streamer.end()
    if thinking is None:
        sequences = sequences[:, : prompt_width + step]
    else:
        # A committed probe may run past max_new_tokens: cut every row there.
        new_tokens.clamp_(max=max_new)
        columns = torch.arange(sequences.shape[1], device=device)[None, :]
        sequences.masked_fill_(columns >= prompt_width + new_tokens[:, None], pad_token_id)
        sequences = sequences[:, : prompt_width + int(new_tokens.max())]
        stats.thinking_tokens = thinking.thinking_tokens()
        stats.early_exits = thinking.early_exits.tolist()
    stats.new_tokens = new_tokens.tolist()
    if thinking is None:
        stats.target_row_forwards = list(stats.new_tokens)  # one forward per token (prefill gives the first)
    else:
        stats.target_row_forwards = row_forwards.tolist()
    if compressor is not None:
        stats.kv_peak_tokens = compressor.peak
        stats.evicted_tokens = compressor.evicted.tolist()
    else:
        stats.kv_peak_tokens = int(cache.cache_lens.max())
    stats.wall_time_s = time.perf_counter() - started
    if graphs is not None:
        stats.compile_time_s = graphs.compile_time_s - compile_before
    if not request.return_dict_in_generate:
        return sequences
    return EffdecodeGenerateOutput(
        sequences=sequences,
        scores=tuple(scores_out) if request.output_scores else None,
        logits=tuple(logits_out) if request.output_logits else None,
        stats=stats,
    )


def _append_emission(sequences: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, emission) -> None:
    """Write each row's ``emission.counts`` tokens from column ``start[b]`` on, without a host sync."""
    offsets = torch.arange(emission.tokens.shape[1], device=rows.device)[None, :]
    columns = start[:, None] + offsets
    current = sequences[rows[:, None], columns]
    sequences[rows[:, None], columns] = torch.where(
        offsets < emission.counts[:, None], emission.tokens, current
    )
