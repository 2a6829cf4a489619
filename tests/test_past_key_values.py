"""``past_key_values`` of effdecode's output: transformers' cache, built lazily, continuable with HF generate.

The loop attaches it at the end of a call (``DecodeCall.finish``: ``output.attach_cache(LazyHFCache(...))``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import effdecode
from effdecode.generation.output import CACHE_FIELD, EffdecodeGenerateOutput, build_hf_cache
from effdecode.patch_state import original_generate
from tiny_models import ragged_prompts, tiny_model


def _generate_with_cache(model, input_ids, monkeypatch, **kwargs) -> EffdecodeGenerateOutput:
    return effdecode.generate(model, input_ids, return_dict_in_generate=True, **kwargs)


def _hf(model, input_ids, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return original_generate(model)(input_ids, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cache_matches_transformers_and_continues_a_conversation(family, monkeypatch):
    model = tiny_model(family, torch.float64, seed=4)
    input_ids, mask = ragged_prompts(3, 7, seed=4, min_len=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    ours = _generate_with_cache(model, input_ids, monkeypatch, **kwargs)
    theirs = _hf(model, input_ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert ours.__dict__.get("_cache_value") is None  # not built until read
    cache = ours.past_key_values
    assert ours["past_key_values"] is cache and getattr(ours, CACHE_FIELD) is cache
    assert CACHE_FIELD in ours.keys()
    width = ours.sequences.shape[1] - 1
    assert cache.get_seq_length() == theirs.past_key_values.get_seq_length() == width
    # Every entry transformers attends (real prompt tokens, generated tokens) is transformers' own.
    real = torch.cat([mask, torch.ones(3, width - mask.shape[1], dtype=mask.dtype)], 1).bool()
    for layer in range(model.config.num_hidden_layers):
        for ours_kv, theirs_kv in (
            (cache.layers[layer].keys, theirs.past_key_values.layers[layer].keys),
            (cache.layers[layer].values, theirs.past_key_values.layers[layer].values),
        ):
            assert ours_kv.shape == theirs_kv.shape
            torch.testing.assert_close(ours_kv.transpose(1, 2)[real], theirs_kv.transpose(1, 2)[real])
            assert not bool(ours_kv.transpose(1, 2)[~real].any())  # padding columns hold zeros

    # Second turn: the returned sequences plus new user tokens, continued by transformers' generate.
    turn = torch.randint(1, 200, (3, 4), generator=torch.Generator().manual_seed(5))
    next_ids = torch.cat([ours.sequences, turn], 1)
    next_mask = torch.cat([mask, torch.ones(3, next_ids.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    follow = dict(attention_mask=next_mask, max_new_tokens=5, do_sample=False)
    from_ours = _hf(model, next_ids, past_key_values=cache, **follow)
    from_theirs = _hf(model, next_ids, past_key_values=copy.deepcopy(theirs.past_key_values), **follow)
    from_scratch = _hf(model, next_ids, **follow)
    assert torch.equal(from_ours, from_theirs) and torch.equal(from_ours, from_scratch)


def test_finished_rows_continue_with_their_pad_columns_masked(monkeypatch):
    model = tiny_model("llama", torch.float64, seed=6)
    input_ids, mask = ragged_prompts(4, 6, seed=6, min_len=2)
    probe = _hf(model, input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    eos = int(probe[1, input_ids.shape[1] + 2])  # row 1 ends after 3 new tokens (others may too)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ours = _generate_with_cache(model, input_ids, monkeypatch, **kwargs)
    theirs = _hf(model, input_ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert min(ours.stats.new_tokens) < 8  # a row finished early: its later columns are pads
    generated = torch.zeros_like(ours.sequences[:, input_ids.shape[1] :])
    for row, count in enumerate(ours.stats.new_tokens):
        generated[row, :count] = 1
    turn = torch.randint(1, 200, (4, 3), generator=torch.Generator().manual_seed(7))
    next_ids = torch.cat([ours.sequences, turn], 1)
    next_mask = torch.cat([mask, generated, torch.ones_like(turn)], 1)
    follow = dict(attention_mask=next_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    from_ours = _hf(model, next_ids, past_key_values=ours.past_key_values, **follow)
    from_theirs = _hf(model, next_ids, past_key_values=theirs.past_key_values, **follow)
    assert torch.equal(from_ours, from_theirs)


def test_eviction_keeps_the_kept_entries_right_aligned(monkeypatch):
    model = tiny_model("llama", torch.float64, seed=8)
    input_ids, mask = ragged_prompts(2, 5, seed=8, min_len=3)
    config = effdecode.DecodeConfig(kv_budget=10, kv_window=4, kv_sinks=2, compress_every=2)
    out = _generate_with_cache(
        model, input_ids, monkeypatch, attention_mask=mask, max_new_tokens=16, decode_config=config
    )
    assert sum(out.stats.evicted_tokens) > 0
    cache = out.past_key_values
    keys = cache.layers[0].keys  # [B, kv_heads, width, head_dim]
    for row in range(2):
        held = keys[row].abs().sum(dim=(0, 2)) != 0
        kept = int(held.sum())
        assert kept <= 10 + 2  # at most kv_budget + compress_every entries
        end = input_ids.shape[1] + out.stats.new_tokens[row] - 1
        assert bool(held[end - kept : end].all()) and not bool(held[: end - kept].any())


def test_build_hf_cache_places_each_slot_at_its_rows_columns():
    from effdecode.cache import KVGeometry, SlotKVCache

    geometry = KVGeometry(num_layers=2, kv_heads=1, head_dim=2)
    slot_cache = SlotKVCache(geometry, 3, 8, torch.float32, torch.device("cpu"))
    slot_cache.key_buffer.copy_(
        torch.arange(1, 1 + slot_cache.key_buffer.numel()).view_as(slot_cache.key_buffer)
    )
    slot_cache.value_buffer.copy_(-slot_cache.key_buffer)
    slot_cache.cache_lens.copy_(torch.tensor([4, 2, 5], dtype=torch.int32))
    # Output rows 0, 1 live in slots 2, 0; prompt width 3, sequences of width 3 + 3 -> cache width 5.
    cache = build_hf_cache(
        slot_cache, torch.tensor([2, 0]), torch.tensor([3, 1]), torch.tensor([3, 3]), 3, 5, None
    )
    for layer in range(2):
        keys = cache.layers[layer].keys[:, 0, :, 0]
        slot_keys = slot_cache.keys[layer][:, 0, :, 0]
        # Row 0 (slot 2): prompt 3 + 2 fed tokens = 5 entries from column 0.
        assert torch.equal(keys[0], slot_keys[2, :5])
        # Row 1 (slot 0): 1 prompt token at column 2, then 2 fed tokens: 3 of its 4 entries (the 4th is past
        # its last token, e.g. a token after EOS inside an accepted draft run).
        assert torch.equal(keys[1], torch.cat([torch.zeros(2), slot_keys[0, :3]]))
        assert torch.equal(
            cache.layers[layer].values[:, 0, :, 0], -cache.layers[layer].keys[:, 0, :, 0] + 0.0
        )
