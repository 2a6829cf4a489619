"""The decode loop over the slot cache.

prefill (all prompts in one forward) -> loop: forward the active rows -> process logits -> choose tokens ->
append, check stops -> finished rows leave ``rows``. A finished row's KV stays where it is and costs nothing.
One device-to-host copy per step (the finished flags) decides who stays; everything else stays on device.
"""

from __future__ import annotations

import time

import torch

from effdecode.cache import KVGeometry, SlotKVCache
from effdecode.generation.logits import LogitsPipeline
from effdecode.generation.output import EffdecodeGenerateOutput
from effdecode.generation.request import GenerationRequest
from effdecode.generation.steps import criteria_hit, forward_logits, prefill
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
    input_ids = request.input_ids
    batch_size, prompt_width = input_ids.shape
    max_prompt = int(request.prompt_lens.max())
    cache = SlotKVCache(
        KVGeometry.from_config(model.config),
        batch_size,
        max_prompt + request.max_new_tokens,
        model.dtype,
        device,
    )
    backend = request.decode_config.attn_backend
    pipeline = LogitsPipeline(request, device)
    eos_ids = pipeline.eos_ids
    pad_token_id = request.pad_token_id if request.pad_token_id is not None else 0
    sequences = torch.full(
        (batch_size, prompt_width + request.max_new_tokens), pad_token_id, dtype=torch.long, device=device
    )
    sequences[:, :prompt_width] = input_ids
    new_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, dtype=torch.int32, device=device)
    streamer = request.streamer
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    stats = GenerationStats(kv_peak_bytes=cache.nbytes)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    with routed_through_effdecode(model), torch.inference_mode():
        logits = prefill(model, cache, input_ids, request.prompt_lens, backend)
        kv_len_bound = max_prompt
        stats.target_forwards = 1
        one_token = torch.ones(batch_size, dtype=torch.int32, device=device)
        one_position = torch.ones(batch_size, dtype=torch.long, device=device)

        # transformers pads a finished row only when it knows an EOS token; without one, a row that a
        # stopping criterion ended keeps generating until every row is done. Mirror that.
        rows_leave = eos_ids.numel() > 0
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        step = 0
        while True:
            rows_long = rows.long()
            history = (
                sequences[:, : prompt_width + step].index_select(0, rows_long)
                if pipeline.needs_history
                else None
            )
            scores = pipeline.process(logits, history, new_tokens[rows_long])
            next_tokens = pipeline.choose(scores, rows_long)
            sequences[rows_long, prompt_width + new_tokens[rows_long]] = next_tokens
            new_tokens[rows_long] += 1
            step += 1
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
                        0, rows_long.cpu(), next_tokens.cpu()
                    )
                )

            done = (
                torch.isin(next_tokens, eos_ids)
                if eos_ids.numel()
                else torch.zeros_like(next_tokens, dtype=torch.bool)
            )
            if request.stopping_criteria:
                history = sequences[:, : prompt_width + step].index_select(0, rows_long)
                done = done | criteria_hit(request.stopping_criteria, history, scores)
            out_of_time = request.max_time is not None and time.perf_counter() - started > request.max_time
            if step >= request.max_new_tokens or out_of_time:
                break
            if rows_leave:
                done_host = done.cpu()  # the step's one sync: which rows stay
                if bool(done_host.all()):
                    break
                if bool(done_host.any()):
                    keep = (~done).nonzero().squeeze(1)
                    rows = rows.index_select(0, keep)
                    next_tokens = next_tokens.index_select(0, keep)
                    rows_long = rows.long()
            else:
                unfinished &= ~done
                if not bool(unfinished.any()):
                    break

            num_rows = rows.shape[0]
            batch = SlotBatch(
                rows,
                cache.cache_lens,
                one_token[:num_rows],
                kv_len_bound=kv_len_bound + 1,
                backend=backend,
                rows_are_leading_slots=num_rows == batch_size,
                q_full=True,
            )
            positions = cache.positions.index_select(0, rows_long)[:, None]
            logits = forward_logits(model, cache, batch, next_tokens[:, None], positions)
            cache.cache_lens.index_add_(0, rows_long, one_token[:num_rows])
            cache.positions.index_add_(0, rows_long, one_position[:num_rows])
            kv_len_bound += 1
            stats.target_forwards += 1

    if streamer is not None:
        streamer.end()
    sequences = sequences[:, : prompt_width + step]
    stats.new_tokens = new_tokens.tolist()
    stats.target_row_forwards = list(stats.new_tokens)  # one forward per token (prefill gives the first)
    stats.kv_peak_tokens = int(cache.cache_lens.max())
    stats.wall_time_s = time.perf_counter() - started
    if not request.return_dict_in_generate:
        return sequences
    return EffdecodeGenerateOutput(
        sequences=sequences,
        scores=tuple(scores_out) if request.output_scores else None,
        logits=tuple(logits_out) if request.output_logits else None,
        stats=stats,
    )
