"""Thinking budgets and spans inside speculative decoding: the same tokens as the plain loop, with drafts."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_engine_equivalence import _StopAfterToken
from test_speculative import repetitive_prompts
from test_thought_compression import _deer_config, _rigged
from transformers import StoppingCriteriaList

import effdecode
from effdecode import DecodeConfig
from effdecode.generation import drafters, step
from effdecode.generation.markers import first_marker_end
from effdecode.generation.thinking import ThinkingController
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


@pytest.fixture
def probe_counter(monkeypatch):
    """Probes started per call: the ``probes`` of every ThinkingController built, in order."""
    controllers = []
    original = ThinkingController.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        controllers.append(self)

    monkeypatch.setattr(ThinkingController, "__init__", recording)
    return lambda: [c.probes for c in controllers]


def _deer_case(scale: float, new: int, kv: dict | None = None):
    """A rigged model, repetitive prompts and triggers its free decoding writes in the middle of every row.

    With the perfect draft these triggers fall inside accepted runs: speculation must cut runs there.
    """
    model = _rigged(scale)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    free = _generate(model, ids, mask, new, DecodeConfig(**(kv or {})))
    width = ids.shape[1]
    singles = [[free.sequences[row, width + k].item()] for row in range(3) for k in (3, 11)]
    pair = free.sequences[1, width + 5 : width + 7].tolist()  # a two-token trigger
    return model, ids, mask, singles + [pair], free


def _assert_deer_same(plain, spec, probes):
    _assert_same(plain, spec)
    assert spec.stats.early_exits == plain.stats.early_exits
    assert sum(spec.stats.proposed_draft_tokens) > 0  # speculation really ran
    first, second = probes()[-2:]
    assert first == second > 0  # the same probes started


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_confident_early_exit_with_drafts_matches_plain(drafter, replace, probe_counter):
    model, ids, mask, triggers, free = _deer_case(50.0, 30)
    cfg = _deer_config(triggers, replace)
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, **_draft(drafter, model))
    _assert_deer_same(plain, spec, probe_counter)
    assert spec.stats.early_exits == [1, 1, 1]
    assert not torch.equal(spec.sequences, free.sequences)
    if drafter == "perfect":  # the draft cache follows committed probes (and replaced triggers) exactly
        assert spec.stats.accepted_draft_tokens == spec.stats.proposed_draft_tokens


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_confident_probe_replaces_a_two_token_trigger_with_drafts(drafter, probe_counter):
    # The trigger's first token is in the caches already (the draft's too): the probe's text overwrites it.
    model, ids, mask, _, free = _deer_case(50.0, 30)
    width = ids.shape[1]
    triggers = [free.sequences[row, width + 2 : width + 4].tolist() for row in range(3)]
    cfg = _deer_config(triggers, replace=True)
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, **_draft(drafter, model))
    _assert_deer_same(plain, spec, probe_counter)
    assert spec.stats.early_exits == [1, 1, 1]
    assert spec.sequences[:, width + 2 : width + 5].tolist() == [[5, 7, 6]] * 3  # the trigger is gone
    if drafter == "perfect":
        assert spec.stats.accepted_draft_tokens == spec.stats.proposed_draft_tokens


def test_replaced_trigger_leaves_the_draft_cache(monkeypatch):
    # Layer-0 keys depend on the token and its position only: with the target as its own draft, both caches
    # must hold the same keys wherever both hold entries, so no replaced trigger token stays in the draft's.
    caches = {}
    original_init = drafters.ModelDrafter.__init__
    original_cache = step.decode_cache

    def drafter_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        caches["draft"] = self.cache

    def target_cache(*args, **kwargs):
        cache, graphs = original_cache(*args, **kwargs)
        caches["target"] = cache
        return cache, graphs

    monkeypatch.setattr(drafters.ModelDrafter, "__init__", drafter_init)
    monkeypatch.setattr(step, "decode_cache", target_cache)
    model, ids, mask, _, free = _deer_case(50.0, 30)
    width = ids.shape[1]
    triggers = [free.sequences[row, width + 2 : width + 4].tolist() for row in range(3)]
    out = _generate(model, ids, mask, 30, _deer_config(triggers, replace=True), assistant_model=model)
    assert out.stats.early_exits == [1, 1, 1]
    draft, target = caches["draft"], caches["target"]
    for row in range(3):
        held = min(int(draft.cache_lens[row]), int(target.cache_lens[row]))
        assert held > int(mask[row].sum()) + 5  # past the probe text
        keys = draft.key_buffer[0, row, :, :held], target.key_buffer[0, row, :, :held]
        torch.testing.assert_close(*keys)


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_unconfident_early_exit_with_drafts_rolls_back_exactly(drafter, replace, probe_counter):
    model, ids, mask, triggers, free = _deer_case(1e-3, 30)
    cfg = _deer_config(triggers, replace)
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, **_draft(drafter, model))
    _assert_deer_same(plain, spec, probe_counter)
    assert spec.stats.early_exits == [0, 0, 0]
    assert torch.equal(spec.sequences, free.sequences)  # every probe rolled back exactly
    assert probe_counter()[-1] >= 6


@pytest.mark.parametrize("scale", [50.0, 1e-3])
@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("policy", ["streaming", "h2o"])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_early_exit_with_drafts_and_eviction_matches_plain(drafter, policy, replace, scale, probe_counter):
    kv = dict(kv_budget=24, kv_window=8, kv_sinks=2, compress_every=8, kv_policy=policy)
    model, ids, mask, triggers, free = _deer_case(scale, 44, kv)
    cfg = _deer_config(triggers, replace, **kv)
    plain = _generate(model, ids, mask, 44, cfg)
    spec = _generate(model, ids, mask, 44, cfg, **_draft(drafter, model))
    _assert_deer_same(plain, spec, probe_counter)
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens
    assert min(spec.stats.evicted_tokens) > 0
    assert spec.stats.kv_peak_tokens <= plain.stats.kv_peak_tokens
    if scale < 1:
        assert torch.equal(spec.sequences, free.sequences)


@pytest.mark.parametrize("scale", [50.0, 1e-3])
@pytest.mark.parametrize("budget", [4, 9])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_early_exit_and_thinking_budget_with_drafts_match_plain(drafter, budget, scale, probe_counter):
    # A row may reach its budget with the trigger that starts a probe: forcing waits until it is decided.
    model, ids, mask, triggers, _ = _deer_case(scale, 30)
    cfg = _deer_config(triggers, thinking_budget=budget, think_end_prefix=[5, 6])
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, **_draft(drafter, model))
    _assert_deer_same(plain, spec, probe_counter)


def test_early_exit_keeps_speculation_on():
    # Probes used to turn speculation off; now drafts run around them and save target forwards.
    model, ids, mask, triggers, _ = _deer_case(50.0, 30)
    cfg = _deer_config(triggers)
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, assistant_model=model)  # warnings are errors here
    assert torch.equal(plain.sequences, spec.sequences)
    assert sum(spec.stats.accepted_draft_tokens) > 0
    assert spec.stats.target_forwards < plain.stats.target_forwards


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


@pytest.mark.parametrize("drafter", ["none", "ngram", "perfect"])
def test_stop_criterion_after_a_committed_probe(drafter):
    # A confident probe makes its row longer than the others; a stopping criterion still sees each row's own
    # last token (the plain loop used to look at a shared column, padding for the shorter rows).
    model = _rigged(50.0)
    ids, mask = repetitive_prompts(3, 10, seed=1)
    free = _generate(model, ids, mask, 24, DecodeConfig())
    width = ids.shape[1]
    trigger = free.sequences[0, width + 2].item()
    cfg = _deer_config([[trigger]])
    exited = _generate(model, ids, mask, 24, cfg)
    assert exited.stats.early_exits[0] == 1
    stopper = exited.sequences[0, width + 9].item()  # written by row 0 after its committed probe
    kwargs = {} if drafter == "none" else _draft(drafter, model)
    criteria = StoppingCriteriaList([_StopAfterToken(stopper)])
    out = _generate(
        model, ids, mask, 24, cfg, stopping_criteria=criteria, pad_token_id=0, eos_token_id=1, **kwargs
    )
    row = out.sequences[0, width:].tolist()
    stop_at = exited.sequences[0, width:].tolist().index(stopper)
    assert row[: stop_at + 1] == exited.sequences[0, width : width + stop_at + 1].tolist()
    assert all(token == 0 for token in row[stop_at + 1 :])  # the row stopped right after the stopper
