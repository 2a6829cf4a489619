"""The CPU decode-attention kernel (``effdecode::cpu_decode_attention``) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from effdecode.ops.cpu_decode_attention import (
    cpu_decode_attention,
    cpu_decode_attention_reference,
    kernel_available,
)

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no C++ compiler for the CPU kernel")


def _inputs(dtype, batch=5, kv_heads=2, group=2, head_dim=64, slots=9, capacity=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layers = 3
    shape = (layers, slots, kv_heads, capacity, head_dim)
    keys = torch.randn(shape, generator=generator, dtype=dtype)
    values = torch.randn(shape, generator=generator, dtype=dtype)
    query = torch.randn(batch, kv_heads, group, head_dim, generator=generator, dtype=dtype)
    rows = torch.randperm(slots, generator=generator)[:batch].to(torch.int32)
    lens = torch.randint(1, capacity + 1, (batch,), generator=generator, dtype=torch.int32)
    lens[0] = capacity  # a full slot
    return query, keys[1], values[1], rows, lens  # one layer's view of the cache, as a step passes it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("kv_heads", "group", "head_dim"), [(2, 2, 64), (1, 4, 80), (4, 1, 8), (2, 3, 20)]
)  # vector-width multiples and tails, MHA and GQA
@pytest.mark.parametrize("variant", ["plain", "softcap", "window", "sinks", "all"])
def test_kernel_matches_reference(dtype, kv_heads, group, head_dim, variant):
    query, keys, values, rows, lens = _inputs(dtype, kv_heads=kv_heads, group=group, head_dim=head_dim)
    options = {}
    if variant in ("softcap", "all"):
        options["softcap"] = 1.5  # small enough to cap most logits of these random inputs
    if variant in ("window", "all"):
        options["window"] = 17  # shorter than most rows, longer than some
    if variant in ("sinks", "all"):
        options["sinks"] = torch.randn(kv_heads * group, dtype=dtype) * 3
    out = cpu_decode_attention(query, keys, values, rows, lens, head_dim**-0.5, **options)
    expected = cpu_decode_attention_reference(query, keys, values, rows, lens, head_dim**-0.5, **options)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, expected, **tolerance)
    if variant != "plain":  # the option changed the result (the test can tell it was applied)
        plain = cpu_decode_attention_reference(query, keys, values, rows, lens, head_dim**-0.5)
        assert not torch.allclose(out, plain, atol=1e-3)


def test_each_row_reads_only_its_own_entries():
    """Entries past a row's length (NaN here) and other slots never reach its output; length 0 gives zeros."""
    query, keys, values, rows, lens = _inputs(torch.float32, seed=3)
    lens[1] = 0
    for cache in (keys, values):
        for slot, length in zip(rows.tolist(), lens.tolist(), strict=True):
            cache[slot, :, length:] = float("nan")
    unused = sorted(set(range(keys.shape[0])) - set(rows.tolist()))
    keys[unused], values[unused] = float("nan"), float("nan")
    out = cpu_decode_attention(query, keys, values, rows, lens, 0.125)
    assert not out.isnan().any()
    assert bool((out[1] == 0).all())
    expected = cpu_decode_attention_reference(query, keys, values, rows, lens, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_threads_do_not_change_the_result():
    query, keys, values, rows, lens = _inputs(torch.float64, batch=8, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_decode_attention(query, keys, values, rows, lens, 0.125)
        torch.set_num_threads(2)
        two = cpu_decode_attention(query, keys, values, rows, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # rows and heads are split between threads, never a sum


def test_the_op_compiles_into_a_full_graph():
    query, keys, values, rows, lens = _inputs(torch.float32, seed=7)

    def step(query, keys, values, rows, lens):
        out = torch.ops.effdecode.cpu_decode_attention(query * 2, keys, values, rows, lens + 0, 0.125)
        return out.sum(dim=2)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    expected = cpu_decode_attention_reference(query * 2, keys, values, rows, lens, 0.125).sum(dim=2)
    torch.testing.assert_close(compiled(query, keys, values, rows, lens), expected, atol=1e-5, rtol=1e-5)


def _column_major(cache: torch.Tensor) -> torch.Tensor:
    return cache.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, entries no longer rows


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v, r, n: (q.double(), k, v, r, n), "float32 or float64"),
        (lambda q, k, v, r, n: (q, k, v, r.long(), n), "int32"),
        (lambda q, k, v, r, n: (q, k, v, r, n[:-1]), r"\[B\]"),
        (lambda q, k, v, r, n: (q[:, :1], k, v, r, n), "does not match"),
        (lambda q, k, v, r, n: (q, _column_major(k), v, r, n), "contiguous rows"),
        (lambda q, k, v, r, n: (q, k, v, r, n, 0.0, 0, torch.zeros(3)), "sinks"),
    ],
)
def test_bad_input_is_a_value_error(change, message):
    query, keys, values, rows, lens, *options = change(*_inputs(torch.float32))
    with pytest.raises(ValueError, match=message):
        cpu_decode_attention(query, keys, values, rows, lens, 0.125, *options)
