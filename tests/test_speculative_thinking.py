"""Thinking budgets and spans inside speculative decoding: the same tokens as the plain loop, with drafts."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_speculative import repetitive_prompts

import effdecode
from effdecode import DecodeConfig
from effdecode.generation.markers import first_marker_end
from tiny_models import tiny_model

DRAFTERS = ["ngram", "perfect", "weak"]


def _draft(kind: str, model) -> dict:
    if kind == "ngram":
        return dict(prompt_lookup_num_tokens=3)
    if kind == "perfect":
        return dict(assistant_model=model)
    return dict(assistant_model=tiny_model("llama", torch.float64, seed=1))


def _generate(model, ids, mask, new, config, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # speculation must not be switched off
        return effdecode.generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            decode_config=config,
            **kwargs,
        )


def _assert_same(plain, spec):
    assert torch.equal(plain.sequences, spec.sequences)
    assert spec.stats.thinking_tokens == plain.stats.thinking_tokens


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_thinking_budget_with_drafts_matches_plain(drafter):
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=2)
    cfg = DecodeConfig(thinking_budget=9, think_start=None, think_end=[7], think_end_prefix=[5, 6])
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, **_draft(drafter, model))
    _assert_same(plain, spec)
    assert plain.stats.thinking_tokens == [9, 9, 9]
    assert sum(spec.stats.proposed_draft_tokens) > 0
    if drafter == "perfect":
        assert sum(spec.stats.accepted_draft_tokens) > 0
        assert spec.stats.target_forwards < plain.stats.target_forwards


@pytest.mark.parametrize("drafter", ["ngram", "perfect"])
def test_long_forced_text_under_a_tight_kv_limit(drafter):
    # The forced text (12 tokens) is longer than a row's room before its KV limit: it is forced over several
    # steps, with compactions in between, exactly where plain decoding compacts.
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=6)
    prefix = list(range(20, 31))
    cfg = DecodeConfig(
        thinking_budget=6,
        think_start=None,
        think_end=[7],
        think_end_prefix=prefix,
        kv_budget=20,
        kv_window=6,
        kv_sinks=2,
        compress_every=5,
        kv_policy="streaming",
    )
    plain = _generate(model, ids, mask, 40, cfg)
    spec = _generate(model, ids, mask, 40, cfg, **_draft(drafter, model))
    _assert_same(plain, spec)
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens
    width = ids.shape[1]
    for row in range(3):
        assert spec.sequences[row, width + 6 : width + 18].tolist() == prefix + [7]


@pytest.mark.parametrize("drafter", ["ngram", "perfect"])
def test_markers_inside_accepted_runs(drafter):
    # think_end and think_start are tokens the model writes by itself: a run that contains one is cut there,
    # so spans close and reopen where plain decoding sees them, and the budget counts the same tokens.
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=8)
    opening = 311  # outside the prompts' and the model's usual tokens
    ids[:, -1] = opening  # every row opens a span in its prompt
    free = _generate(model, ids, mask, 40, DecodeConfig())
    written = free.sequences[0, ids.shape[1] :].tolist()
    end_token = written[4]  # row 0 closes its span after 5 tokens...
    start_token = next(t for t in written[8:] if t not in (end_token, opening))  # ...and opens one again
    cfg = DecodeConfig(
        thinking_budget=12, think_start=[start_token], think_end=[end_token], think_end_prefix=[3]
    )
    plain = _generate(model, ids, mask, 40, cfg)
    spec = _generate(model, ids, mask, 40, cfg, **_draft(drafter, model))
    _assert_same(plain, spec)
    assert 5 <= plain.stats.thinking_tokens[0] <= 12
    if drafter == "perfect":
        assert max(spec.stats.accepted_draft_tokens) > 10  # long runs: the markers fall inside them


def test_thinking_only_eviction_with_drafts_matches_plain():
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(2, 12, seed=9)
    cfg = DecodeConfig(
        thinking_budget=14,
        think_start=None,
        think_end=[7],
        think_end_prefix=[5],
        kv_budget=18,
        kv_window=4,
        kv_sinks=2,
        compress_every=6,
        kv_think_only=True,
    )
    plain = _generate(model, ids, mask, 36, cfg)
    spec = _generate(model, ids, mask, 36, cfg, assistant_model=model)
    _assert_same(plain, spec)
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens
    assert sum(spec.stats.evicted_tokens) > 0


def test_sampling_with_drafts_forces_the_end_at_the_budget():
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(4, 10, seed=3)
    cfg = DecodeConfig(thinking_budget=6, think_start=None, think_end=[7], think_end_prefix=[5, 6])
    torch.manual_seed(0)
    out = effdecode.generate(
        model, ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=0,
        return_dict_in_generate=True, decode_config=cfg, assistant_model=model,
    )  # fmt: skip
    width = ids.shape[1]
    for row in range(4):
        new = out.sequences[row, width:].tolist()
        thought = new.index(7) + 1 if 7 in new[:6] else 6  # the model may write think_end by itself
        if thought == 6:
            assert new[6:9] == [5, 6, 7]
        assert out.stats.thinking_tokens[row] == thought
    assert sum(out.stats.accepted_draft_tokens) > 0


def test_early_exit_still_turns_speculation_off():
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(2, 10, seed=3)
    cfg = DecodeConfig(
        early_exit="deer", early_exit_triggers=[[9]], early_exit_probe=[7, 8], think_start=None, think_end=[7]
    )
    with pytest.warns(UserWarning, match="speculative decoding is off"):
        effdecode.generate(
            model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, decode_config=cfg,
            prompt_lookup_num_tokens=3,
        )  # fmt: skip


def test_first_marker_end_matches_a_loop(fresh_seed):
    rows, width, num_cols = 5, 9, 6
    sequences = torch.randint(0, 3, (rows + 1, width))
    slots = torch.randperm(rows + 1)[:rows]
    ends = torch.randint(0, width, (rows,))
    emitted = torch.randint(0, 3, (rows, num_cols))
    num_emitted = torch.randint(0, num_cols + 1, (rows,))
    for length in (1, 2, 3):
        marker = torch.randint(0, 3, (length,))
        got = first_marker_end(sequences, slots, ends, emitted, num_emitted, marker)
        for b in range(rows):
            tokens = sequences[slots[b], : ends[b] + 1].tolist() + emitted[b, : num_emitted[b]].tolist()
            before = int(ends[b]) + 1
            want = num_cols
            for j in range(int(num_emitted[b])):
                end = before + j + 1
                if end >= length and tokens[end - length : end] == marker.tolist():
                    want = j
                    break
            assert int(got[b]) == want, (b, length)
