"""The compiled decode step (``DecodeConfig(compile=True)``): one graph per step, no recompiles, same tokens.

CPU compilation is slow (tens of seconds per step graph), so the default tests compile few steps: a shared
2-layer float64 model whose compiled steps live on it across the tests of this module. The matrix over model
families, batch sizes and decoding modes is marked ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import effdecode
from effdecode import DecodeConfig
from effdecode.generation import compiled
from effdecode.generation.compiled import kv_bucket_for
from effdecode.generation.graphs import graphs_of, release_graphs, width_for
from effdecode.ops import custom_ops
from effdecode.ops.attention import SlotBatch, slot_attention_reference
from tiny_models import family_available, ragged_prompts, tiny_family_model, tiny_model


def _generate(model, ids, mask, compile_steps: bool, new: int, **kwargs):
    return effdecode.generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        decode_config=DecodeConfig(compile=compile_steps, **kwargs.pop("decode", {})),
        **kwargs,
    )


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def model():
    """float64 Qwen2 whose EOS tokens make rows finish at different steps; its compiled steps are shared."""
    model = tiny_model("qwen2", torch.float64, eos_token_id=[5, 17, 33])
    yield model
    effdecode.unpatch(model)
    release_graphs(model)


def test_compile_config_is_validated():
    with pytest.raises(ValueError, match="compile"):
        DecodeConfig(compile="yes")


def test_compile_flags_reach_decode_config():
    from effdecode.cli import _decode_config, build_parser
    from effdecode.eval import options_from_args

    assert options_from_args(build_parser().parse_args(["eval", "--compile"])).decode_config().compile
    assert not options_from_args(build_parser().parse_args(["eval"])).decode_config().compile
    assert _decode_config(build_parser().parse_args(["demo", "--compile"])).compile


def test_width_for():
    assert [width_for(n) for n in (2, 3, 4, 5, 8, 9, 16)] == [2, 4, 4, 8, 8, 16, 16]


def test_kv_bucket_for():
    assert [kv_bucket_for(n, 512) for n in (1, 64, 65, 128, 129, 256, 257, 449, 512, 600)] == [
        64, 64, 128, 128, 192, 256, 320, 512, 512, 512
    ]  # fmt: skip
    assert [kv_bucket_for(n, 256) for n in (1, 32, 33, 100, 200)] == [32, 32, 64, 128, 224]
    assert [kv_bucket_for(n, 128) for n in (1, 20, 40)] == [32, 32, 64]  # no bucket under 32
    assert kv_bucket_for(3, 16) == 16  # a capacity under the smallest bucket is its only bucket


def test_compiled_steps_equal_eager_without_recompiling(model):
    """200 tokens, rows leaving at different steps: one graph per (row bucket, KV bucket), no graph break, no
    recompile in steady state or on the next call, greedy tokens identical to eager decoding; unpatch frees
    it all."""
    ids, mask = ragged_prompts(3, 9, seed=5)
    eager = _generate(model, ids, mask, False, 200)
    new_tokens = eager.stats.new_tokens
    assert len(set(new_tokens)) > 1 and max(new_tokens) > 100  # rows leave, at different steps

    breaks, graphs_before = _graph_breaks(), _compiled_graphs()
    effdecode.patch(model, DecodeConfig(compile=True))
    first = model.generate(
        ids, attention_mask=mask, max_new_tokens=200, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(first.sequences, eager.sequences)
    runner = graphs_of(model)
    steps = [step for step in runner.steps.values() if step.compiled is not None]
    buckets = sorted((step.compiled.bucket, step.compiled.kv_len) for step in steps)
    assert len(set(buckets)) == len(buckets)
    assert len({b for b, _ in buckets}) >= 2  # rows left: smaller row buckets took over
    # Attention over each row's own entries (the CPU kernel): no KV buckets, one step per row bucket.
    assert {kv for _, kv in buckets} == {runner.cache.capacity}
    assert _graph_breaks() == breaks
    assert _compiled_graphs() - graphs_before == len(steps)  # each step compiled exactly once
    assert sum(step.compiled.calls for step in steps) > 150  # ... and then replayed without compiling
    assert all(step.compiled.direct_kinds == {"choose"} for step in steps)  # ... and without dynamo
    assert all(step.compiled.cpu_kernel for step in steps)  # attention over each row's own length
    assert first.stats.compile_time_s > 0
    assert first.stats.tokens_per_s > sum(first.stats.new_tokens) / first.stats.wall_time_s

    second = model.generate(
        ids, attention_mask=mask, max_new_tokens=200, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(second.sequences, eager.sequences)
    assert _compiled_graphs() - graphs_before == len(steps)  # nothing recompiled across calls
    assert second.stats.compile_time_s == 0.0

    effdecode.unpatch(model)
    assert not hasattr(model, "_effdecode_graphs")


def test_new_weights_drop_the_compiled_steps():
    """Compiled steps keep no dynamo guards: weights replaced by others of another shape (here: 8 more
    tokens in the embeddings and the LM head) make the next call build new steps, whose logits have the new
    vocabulary and whose tokens equal eager decoding."""
    model = tiny_model("llama", torch.float64)
    ids, mask = ragged_prompts(1, 5, seed=4)
    _generate(model, ids, mask, True, 3)
    old_steps = list(graphs_of(model).steps.values())
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 8)
    eager = _generate(model, ids, mask, False, 6)
    out = _generate(model, ids, mask, True, 6)
    assert torch.equal(out.sequences, eager.sequences)
    steps = graphs_of(model).steps.values()
    assert not any(step in old_steps for step in steps)
    with torch.inference_mode():  # (logits, tokens) or logits: the first element's last dim is the vocab
        assert all(step.replay()[0].shape[-1] == vocab + 8 for step in steps)
    release_graphs(model)


def test_compiled_padding_rows_write_nothing_and_greedy_chooses_in_graph(model):
    """3 rows in a bucket of 4: the padding row takes an unused slot with q_len 0 and must leave it as it
    was (a finished row's KV could live there); greedy decoding picks its tokens in the compiled graph."""
    ids, mask = ragged_prompts(3, 9, seed=7)
    eager = _generate(model, ids, mask, False, 12)
    _generate(model, ids, mask, True, 2)  # the model's persistent cache exists now (4 + 1 slots)
    cache = graphs_of(model).cache
    assert cache.num_slots == 5
    sentinel = 7.25
    cache.key_buffer[:, 3].fill_(sentinel)  # slot 3: the first unused slot, so the padding row's
    cache.value_buffer[:, 3].fill_(sentinel)
    out = _generate(model, ids, mask, True, 12)
    assert torch.equal(out.sequences, eager.sequences)
    assert bool((cache.key_buffer[:, 3] == sentinel).all()) and bool(
        (cache.value_buffer[:, 3] == sentinel).all()
    )
    steps = graphs_of(model).steps
    assert any("choose" in key for key in steps)  # the greedy choice ran in the compiled step
    assert all(step.compiled is not None for step in steps.values())
    release_graphs(model)


def test_compiled_steps_attend_inline_without_the_cpu_kernel(model, monkeypatch):
    """With the CPU decode-attention kernel off, one-column steps attend inline over KV buckets that grow
    with the rows: the same tokens as eager decoding (the kernel's path is the other tests')."""
    ids, mask = ragged_prompts(2, 9, seed=8)
    eager = _generate(model, ids, mask, False, 100, eos_token_id=None)
    release_graphs(model)
    monkeypatch.setattr(compiled, "CPU_DECODE_KERNEL", False)
    out = _generate(model, ids, mask, True, 100, eos_token_id=None)
    assert torch.equal(out.sequences, eager.sequences)
    runner = graphs_of(model)
    steps = [step.compiled for step in runner.steps.values()]
    assert steps and not any(step.cpu_kernel for step in steps)
    kv_lens = {step.kv_len for step in steps}
    longest = ids.shape[1] + 100  # the last bucket just holds the longest row
    assert len(kv_lens) >= 3 and max(kv_lens) == kv_bucket_for(longest, runner.cache.capacity)
    release_graphs(model)


@pytest.mark.parametrize("family", ["gemma2"])
def test_compiled_step_has_softcap(family):
    """Gemma2's logit softcap reaches the compiled step's inline attention (MoE families such as gpt-oss do
    not compile yet: data-dependent expert routing)."""
    if not family_available(family):
        pytest.skip(f"model_type {family!r} is not in this transformers version")
    model = tiny_family_model(family, torch.float64)
    ids, mask = ragged_prompts(3, 9, seed=3, vocab=model.config.vocab_size)
    try:
        eager = _generate(model, ids, mask, False, 6)
        compiled_out = _generate(model, ids, mask, True, 6)
        assert torch.equal(compiled_out.sequences, eager.sequences)
    finally:
        effdecode.unpatch(model)
        release_graphs(model)


def test_custom_op_path_compiles_without_graph_breaks(monkeypatch):
    """Attention through the ``effdecode::slot_attention`` custom op inside the compiled step."""
    monkeypatch.setattr(compiled, "INLINE_TORCH_ATTENTION", False)
    model = tiny_model("llama", torch.float64)
    ids, mask = ragged_prompts(1, 7, seed=2)
    eager = _generate(model, ids, mask, False, 16)
    breaks, graphs_before = _graph_breaks(), _compiled_graphs()
    out = _generate(model, ids, mask, True, 16)
    assert torch.equal(out.sequences, eager.sequences)
    assert _graph_breaks() == breaks and _compiled_graphs() - graphs_before == 1
    release_graphs(model)


def _attention_inputs(num_cols: int, q_lens: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    slots, kv_heads, q_heads, capacity, head_dim = 5, 2, 4, 32, 16
    batch = len(q_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query, key, value = (
        rand(batch, q_heads, num_cols, head_dim),
        *(rand(batch, kv_heads, num_cols, head_dim) for _ in range(2)),
    )
    k_cache, v_cache = rand(slots, kv_heads, capacity, head_dim), rand(slots, kv_heads, capacity, head_dim)
    rows = torch.tensor([3, 0, 2][:batch], dtype=torch.int32)
    cache_lens = torch.tensor([4, 9, 1, 6, 0], dtype=torch.int32)
    return query, key, value, k_cache, v_cache, rows, cache_lens, torch.tensor(q_lens, dtype=torch.int32)


@pytest.mark.parametrize("softcap, with_sinks", [(None, False), (2.0, False), (None, True), (2.0, True)])
@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("kv_len", [None, 9])
def test_step_attention_matches_reference_and_q_len_0_rows_write_nothing(softcap, with_sinks, inline, kv_len):
    """The compiled step's attention (inline torch math or the custom op, run eagerly here) against the torch
    reference, softcap and sinks included, over the whole capacity (32) or a KV bucket just holding the rows
    (9); a q_len-0 row (slot 2) writes nothing but the scratch slot."""
    query, key, value, k_cache, v_cache, rows, cache_lens, q_lens = _attention_inputs(3, [3, 1, 0])
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64) if with_sinks else None
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    batch = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=32)
    expected = slot_attention_reference(
        query, key, value, k_ref, v_ref, batch, 0.25, 4, softcap=softcap, sinks=sinks
    )
    keys, values = k_cache[None].clone(), v_cache[None].clone()
    context = compiled.StaticStepContext(
        keys, values, rows, cache_lens, q_lens, 4, "torch", "torch", inline=inline, kv_len=kv_len
    )
    out = context.attend(0, query, key, value, 0.25, 4, softcap, sinks)
    assert out.shape == expected.shape
    torch.testing.assert_close(out[0], expected[0])  # q_len 3
    torch.testing.assert_close(out[1, -1:], expected[1, -1:])  # q_len 1: its valid column
    torch.testing.assert_close(keys[0, :4], k_ref[:4])  # slot 2 (q_len 0) and the others as the reference
    torch.testing.assert_close(values[0, :4], v_ref[:4])


@pytest.mark.parametrize("with_scores", [False, True])
def test_slot_attention_op_matches_reference_and_passes_opcheck(with_scores):
    query, key, value, k_cache, v_cache, rows, cache_lens, q_lens = _attention_inputs(3, [3, 1, 2])
    scores = torch.zeros(k_cache.shape[:3], dtype=torch.float32) if with_scores else None
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    scores_ref = scores.clone() if with_scores else None
    batch = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=32)
    expected = slot_attention_reference(
        query, key, value, k_ref, v_ref, batch, 0.25, 4, scores_out=scores_ref
    )
    out = custom_ops.slot_attention_op(
        query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, 32, 0.25, 4, scores_out=scores
    )
    valid = torch.arange(3)[None, :] >= (3 - q_lens)[:, None]  # padding columns are unspecified
    assert torch.equal(out[valid], expected[valid])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    if with_scores:
        assert torch.equal(scores, scores_ref)
    args = (query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, 32, 0.25, 4)
    torch.library.opcheck(
        custom_ops.slot_attention_op,
        args,
        {"scores_out": scores},
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.skipif(custom_ops.slot_attention_triton_op is None, reason="torch without triton_op")
def test_triton_op_runs_the_triton_kernels_through_wrap_triton():
    """Eagerly (Triton's interpreter on CPU) the triton_op equals the reference; kernels restored after."""
    from effdecode.kernels import slot_attention as kernels

    before = kernels._slot_attention_kernel
    query, key, value, k_cache, v_cache, rows, cache_lens, q_lens = _attention_inputs(2, [2, 1])
    query, key, value = query.float(), key.float(), value.float()
    k_cache, v_cache = k_cache.float(), v_cache.float()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    batch = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=32)
    expected = slot_attention_reference(query, key, value, k_ref, v_ref, batch, 0.25)
    out = custom_ops.slot_attention_triton_op(
        query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, 32, 0.25
    )
    valid = torch.arange(2)[None, :] >= (2 - q_lens)[:, None]
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert kernels._slot_attention_kernel is before


# --- the matrix (slow: every family and bucket compiles its own steps) -------------------------------------


def _speculation(kind: str, model) -> dict:
    if kind == "ngram":
        return dict(prompt_lookup_num_tokens=3)
    if kind == "draft":
        return dict(assistant_model=copy.deepcopy(model), num_assistant_tokens=3)
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("mode", ["plain", "ngram", "draft", "evict"])
def test_compiled_matrix_equals_eager(family, batch, mode):
    model = tiny_model(family, torch.float64, eos_token_id=[5, 17, 33])
    ids, mask = ragged_prompts(batch, 10, seed=batch)
    kwargs = _speculation(mode, model)
    if mode == "evict":
        kwargs["decode"] = dict(kv_budget=24, kv_window=8, kv_sinks=2, compress_every=8)
    eager = _generate(model, ids, mask, False, 48, **copy.copy(kwargs))
    breaks = _graph_breaks()
    out = _generate(model, ids, mask, True, 48, **kwargs)
    assert torch.equal(out.sequences, eager.sequences)
    assert _graph_breaks() == breaks
    assert any(step.compiled is not None for step in graphs_of(model).steps.values())
    release_graphs(model)


def test_a_model_dynamo_cannot_trace_falls_back_to_eager_steps(monkeypatch):
    """MoE expert routing through transformers' eager experts has data-dependent shapes that fullgraph
    compilation refuses (here: the switch to traceable experts is off): the call warns once and decodes
    eagerly, with the same tokens."""
    import warnings

    monkeypatch.setattr(compiled, "experts_configs", lambda model: [])
    model = tiny_family_model("qwen3_moe", torch.float64, seed=0)
    ids, mask = ragged_prompts(2, 5, seed=1, vocab=model.config.vocab_size)
    eager = effdecode.generate(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_out = effdecode.generate(
            model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
            decode_config=DecodeConfig(compile=True),
        )  # fmt: skip
    effdecode.unpatch(model)  # frees the graphs
    assert torch.equal(eager, compiled_out)
    failed = [w for w in caught if "compiling the decode step failed" in str(w.message)]
    assert len(failed) == 1


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_moe_families_compile_with_traceable_experts(family):
    """MoE steps trace transformers' batched_mm experts: no fallback, no graph break, the same greedy tokens
    as eager steps (float64, ragged batch of 3), and the model's experts setting untouched after the call."""
    import warnings

    from effdecode.generation.static_experts import experts_configs

    if not family_available(family):
        pytest.skip(f"model_type {family!r} is not in this transformers version")
    model = tiny_family_model(family, torch.float64, seed=0)
    if not experts_configs(model):
        pytest.skip("this transformers has no batched_mm experts")
    before = model.config._experts_implementation
    ids, mask = ragged_prompts(3, 6, seed=1, vocab=model.config.vocab_size)
    eager = _generate(model, ids, mask, False, 10)
    breaks, graphs_before = _graph_breaks(), _compiled_graphs()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _generate(model, ids, mask, True, 10)
        assert not [w for w in caught if "compiling the decode step failed" in str(w.message)]
        assert torch.equal(out.sequences, eager.sequences)
        assert _graph_breaks() == breaks
        steps = graphs_of(model).steps.values()
        assert steps and all(step.compiled is not None and step.compiled.calls > 0 for step in steps)
        assert _compiled_graphs() - graphs_before == len(steps)  # once each: no recompile in steady state
        assert model.config._experts_implementation == before
    finally:
        effdecode.unpatch(model)
        release_graphs(model)
