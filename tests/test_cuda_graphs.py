"""Decode steps through the CUDA-graph runner: static buffers, buckets, scratch slot, reuse and release.

Off CUDA the runner replays its static-buffer step eagerly, so everything but the capture itself is checked
here; ``test_captured_decode_matches_eager_on_gpu`` checks the capture on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import effdecode
from effdecode import DecodeConfig
from effdecode.generation.graphs import bucket_for, graphs_of
from tiny_models import ragged_prompts, tiny_model


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 200, 256)] == [1, 2, 4, 8, 8, 16, 256, 256]
    assert bucket_for(257) is None


def _run(model, ids, mask, graphs: bool, new: int = 24, **kwargs):
    return effdecode.generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        decode_config=DecodeConfig(cuda_graphs=graphs),
        **kwargs,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_graph_steps_equal_eager_steps_with_rows_leaving(family):
    model = tiny_model(family, torch.float64, eos_token_id=[5, 17, 33])
    ids, mask = ragged_prompts(5, 9, seed=3)
    eager = _run(model, ids, mask, graphs=False, new=40)
    replayed = _run(model, ids, mask, graphs=True, new=40)
    assert torch.equal(eager, replayed)
    runner = graphs_of(model)
    # 5 rows use bucket 8 (3 padding rows in the scratch slot); rows leaving use smaller buckets.
    assert runner.captures >= 1 and (8, 1, "auto") in runner.steps
    assert runner.cache.num_slots == 9


def test_graphs_and_cache_are_reused_across_calls_and_freed_by_unpatch():
    model = tiny_model("llama", torch.float32)
    ids, mask = ragged_prompts(3, 8, seed=1)
    effdecode.patch(model, DecodeConfig(cuda_graphs=True))
    first = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    runner = graphs_of(model)
    cache, captures = runner.cache, runner.captures
    second = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, second)
    assert runner.cache is cache and runner.captures == captures  # nothing re-allocated or re-captured
    # A call that needs more capacity reallocates and captures again.
    model.generate(ids, attention_mask=mask, max_new_tokens=400, do_sample=False)
    assert runner.cache is not cache and runner.cache.capacity >= 8 + 400
    effdecode.unpatch(model)
    assert not hasattr(model, "_effdecode_graphs")


def test_graph_steps_with_streaming_eviction_and_thinking_budget():
    model = tiny_model("llama", torch.float64)
    ids, mask = ragged_prompts(3, 10, seed=2)
    config = dict(
        kv_budget=24,
        kv_window=8,
        kv_sinks=2,
        compress_every=8,
        thinking_budget=6,
        think_start=None,
        think_end=[7],
    )
    outs = [
        effdecode.generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=50,
            do_sample=False,
            decode_config=DecodeConfig(cuda_graphs=graphs, **config),
        )
        for graphs in (False, True)
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_decode_matches_eager_on_gpu():
    model = tiny_model("qwen2", torch.float32).cuda()
    ids, mask = ragged_prompts(6, 12, seed=4)
    ids, mask = ids.cuda(), mask.cuda()
    eager = _run(model, ids, mask, graphs=False, new=48)
    replayed = _run(model, ids, mask, graphs=True, new=48)
    assert graphs_of(model).broken is None
    assert graphs_of(model).steps[(8, 1, "auto")].graph is not None
    assert torch.equal(eager, replayed)


def test_speculative_plain_steps_replay_graphs():
    """Rows that stop drafting decode through the graphs; greedy output is unchanged."""
    model = tiny_model("llama", torch.float64)
    ids, mask = ragged_prompts(3, 10, seed=6)
    eager = _run(model, ids, mask, graphs=False, new=40, prompt_lookup_num_tokens=3)
    replayed = _run(model, ids, mask, graphs=True, new=40, prompt_lookup_num_tokens=3)
    assert torch.equal(eager, replayed)
    assert graphs_of(model).captures >= 1


def test_verify_forwards_replay_graphs_per_q_len():
    """Verify forwards (q_len 1 + k, ragged drafts) replay graphs keyed by (bucket, q_len); same output."""
    model = tiny_model("qwen2", torch.float64)
    ids, mask = ragged_prompts(3, 10, seed=8)
    eager = _run(model, ids, mask, graphs=False, new=30, assistant_model=model, num_assistant_tokens=3)
    replayed = _run(model, ids, mask, graphs=True, new=30, assistant_model=model, num_assistant_tokens=3)
    assert torch.equal(eager, replayed)
    assert any(num_cols > 1 for _, num_cols, _ in graphs_of(model).steps)
