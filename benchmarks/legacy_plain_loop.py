"""The plain decode loop as it was before the merged engine (commit 7ddcfeb), kept as a benchmark baseline.

Only the path without thinking control and without KV eviction is kept (that is what the baseline measures:
the cost of one plain step). ``benchmarks/test_loop_overhead.py`` runs it side by side with the merged loop.
Not part of the package; do not use it for anything but that comparison.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from effdecode.generation.graphs import decode_cache
from effdecode.generation.logits import LogitsPipeline
from effdecode.generation.output import EffdecodeGenerateOutput
from effdecode.generation.steps import criteria_hit, forward_logits, prefill
from effdecode.hf_attention import routed_through_effdecode
from effdecode.ops.attention import SlotBatch
from effdecode.stats import GenerationStats


def legacy_run_generation(model, request):  # noqa: C901 - a frozen copy, kept as it was
    """The old ``engine.run_generation`` for requests without thinking control or eviction."""
    if request.thinking is not None or request.decode_config.compresses:
        raise ValueError("the legacy baseline covers plain decoding only")
    started = time.perf_counter()
    device = model.device
    config = request.decode_config
    input_ids = request.input_ids
    batch_size, prompt_width = input_ids.shape
    max_prompt = int(request.prompt_lens.max())
    max_new = request.max_new_tokens
    capacity = max_prompt + max_new
    cache, graphs = decode_cache(model, config, batch_size, capacity)
    backend = config.attn_backend
    pipeline = LogitsPipeline(request, device)
    eos_ids = pipeline.eos_ids
    pad_token_id = request.pad_token_id if request.pad_token_id is not None else 0
    sequences = torch.full(
        (batch_size, prompt_width + max_new + 1), pad_token_id, dtype=torch.long, device=device
    )
    sequences[:, :prompt_width] = input_ids
    new_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, dtype=torch.int32, device=device)
    stats = GenerationStats(kv_peak_bytes=cache.nbytes)
    with routed_through_effdecode(model), torch.inference_mode():
        logits = prefill(model, cache, input_ids, request.prompt_lens, backend, None)
        kv_len_bound = max_prompt
        stats.target_forwards = 1
        one_token = torch.ones(batch_size, dtype=torch.int32, device=device)
        one_position = torch.ones(batch_size, dtype=torch.long, device=device)
        rows_leave = eos_ids.numel() > 0
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        step = 0
        width_bound = 0
        while True:
            rows_long = rows.long()
            history = (
                sequences[:, : prompt_width + step].index_select(0, rows_long)
                if pipeline.needs_history
                else None
            )
            scores = pipeline.process(logits, history, new_tokens[rows_long])
            next_tokens = pipeline.choose(scores, rows_long)
            step += 1
            sequences[rows_long, prompt_width + new_tokens[rows_long]] = next_tokens
            new_tokens[rows_long] += 1
            width_bound += 1
            done = (
                torch.isin(next_tokens, eos_ids)
                if eos_ids.numel()
                else torch.zeros_like(next_tokens, dtype=torch.bool)
            )
            if request.stopping_criteria:
                width = prompt_width + min(width_bound, max_new)
                history = sequences[:, :width].index_select(0, rows_long)
                done = done | criteria_hit(request.stopping_criteria, history, scores)
            out_of_time = request.max_time is not None and time.perf_counter() - started > request.max_time
            if step >= max_new or out_of_time:
                break
            leaving_host = done.cpu().numpy() if rows_leave else None  # the step's one sync
            if not rows_leave:
                unfinished[rows_long] &= ~done
                if not bool(unfinished[rows_long].any()):
                    break
            if leaving_host is not None:
                if bool(leaving_host.all()):
                    break
                if bool(leaving_host.any()):
                    keep = torch.as_tensor(np.flatnonzero(~leaving_host), device=device)
                    rows = rows.index_select(0, keep)
                    next_tokens = next_tokens.index_select(0, keep)
                    rows_long = rows.long()
            num_rows = rows.shape[0]
            kv_len_bound += 1
            batch = SlotBatch(
                rows,
                cache.cache_lens,
                one_token[:num_rows],
                kv_len_bound=min(kv_len_bound, capacity),
                backend=backend,
                rows_are_leading_slots=num_rows == batch_size,
                q_full=True,
            )
            positions = cache.positions.index_select(0, rows_long)[:, None]
            logits = None
            if graphs is not None:
                logits = graphs.run(model, rows, next_tokens, positions[:, 0], backend)
            if logits is None:
                logits = forward_logits(model, cache, batch, next_tokens[:, None], positions)
            cache.cache_lens.index_add_(0, rows_long, one_token[:num_rows])
            cache.positions.index_add_(0, rows_long, one_position[:num_rows])
            stats.target_forwards += 1
    sequences = sequences[:, : prompt_width + step]
    stats.new_tokens = new_tokens.tolist()
    stats.target_row_forwards = list(stats.new_tokens)
    stats.kv_peak_tokens = int(cache.cache_lens.max())
    stats.wall_time_s = time.perf_counter() - started
    if not request.return_dict_in_generate:
        return sequences
    return EffdecodeGenerateOutput(sequences=sequences, stats=stats)
