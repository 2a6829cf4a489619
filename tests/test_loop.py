"""The merged decode loop: one host copy per plain step, EOS inside forced text, DEER with eviction under
speculation, and every drafter x eviction policy x thinking control combination equal to plain greedy."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch
from test_speculative import repetitive_prompts
from test_thought_compression import _deer_config, _rigged

import effdecode
from effdecode import DecodeConfig
from tiny_models import tiny_model

HOST_COPIES = ("cpu", "item", "tolist", "__bool__", "__int__", "__index__", "__float__")


@pytest.fixture
def host_copies(monkeypatch):
    """Counts calls that copy a tensor to the host (``.cpu()``, ``.item()``, ``bool(t)``, ...)."""
    counter = {"n": 0}
    for name in HOST_COPIES:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counter


def _copies_per_step(counter, model, ids, mask, **kwargs) -> float:
    """Host copies per extra target forward, from two calls of different lengths (setup costs cancel)."""
    counts = []
    for new in (8, 20):
        counter["n"] = 0
        out = effdecode.generate(
            model, ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=319,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
        counts.append((counter["n"], out.stats.target_forwards))
        assert 319 not in out.sequences[:, ids.shape[1] :].tolist()[0]  # no row finished early
    (short, short_forwards), (long, long_forwards) = counts
    return (long - short) / (long_forwards - short_forwards)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_plain_step_copies_to_the_host_once(batch, host_copies):
    model = tiny_model("llama", torch.float64, seed=3)
    ids, mask = repetitive_prompts(batch, 12, seed=5)
    assert _copies_per_step(host_copies, model, ids, mask) == 1.0


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_a_speculative_step_copies_no_more_than_the_old_loop(drafter, host_copies):
    # Measured on the separate speculative loop this one replaced (commit 7ddcfeb), same workload: 4.0 host
    # copies per target forward with n-gram drafts, 5.0 with a draft model.
    model = tiny_model("llama", torch.float64, seed=3)
    ids, mask = repetitive_prompts(3, 12, seed=5)
    # A fixed draft length keeps the two calls' forward counts apart (a perfect draft at the default 20
    # would cover both lengths in one verify forward).
    kwargs = (
        dict(prompt_lookup_num_tokens=3)
        if drafter == "ngram"
        else dict(assistant_model=model, num_assistant_tokens=3, num_assistant_tokens_schedule="constant")
    )
    assert _copies_per_step(host_copies, model, ids, mask, **kwargs) <= (4.0 if drafter == "ngram" else 5.0)


def _generate(model, ids, mask, new, config, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # speculation must not be switched off
        return effdecode.generate(
            model, ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, decode_config=config, **kwargs,
        )  # fmt: skip


def _draft(kind: str, model) -> dict:
    return dict(prompt_lookup_num_tokens=3) if kind == "ngram" else dict(assistant_model=model)


def _assert_ends_at(out, width: int, eos: int, most: int) -> None:
    """Every row's new tokens end at its first ``eos``, within ``most`` tokens; padding after it."""
    for row, tokens in enumerate(out.sequences[:, width:].tolist()):
        new = out.stats.new_tokens[row]
        assert eos in tokens[:new] and tokens.index(eos) == new - 1 <= most - 1, (row, tokens)
        assert all(t == 0 for t in tokens[new:])


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
@pytest.mark.parametrize("where", ["think_end", "think_end_prefix", "probe"])
def test_an_eos_id_in_forced_text_ends_the_row_with_drafts(drafter, where):
    # Issue 15, item 2: forced text (think_end, its prefix, a committed DEER probe) holding an EOS id.
    model = _rigged(50.0)
    ids, mask = repetitive_prompts(3, 12, seed=2)
    eos = 5
    if where == "think_end":
        cfg = DecodeConfig(thinking_budget=8, think_start=None, think_end=[eos])
    elif where == "think_end_prefix":
        cfg = DecodeConfig(thinking_budget=8, think_start=None, think_end=[7], think_end_prefix=[6, eos, 8])
    else:
        free = _generate(model, ids, mask, 12, DecodeConfig())
        triggers = [[free.sequences[row, ids.shape[1] + 2].item()] for row in range(3)]
        cfg = _deer_config(triggers)  # probe [5, 7, 6]: its first token is the EOS id
    plain = _generate(model, ids, mask, 20, cfg, eos_token_id=eos)
    spec = _generate(model, ids, mask, 20, cfg, eos_token_id=eos, **_draft(drafter, model))
    assert torch.equal(plain.sequences, spec.sequences)
    assert sum(spec.stats.proposed_draft_tokens) > 0
    _assert_ends_at(plain, ids.shape[1], eos, most=10)  # budget, forced text up to the EOS, answer token


@pytest.mark.parametrize("policy", ["snapkv", "rkv"])
@pytest.mark.parametrize("compress_every", [1, 2, 5])
@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_deer_with_snapkv_or_rkv_and_small_compress_every_matches_plain(policy, compress_every, drafter):
    # Issue 15, item 3.
    model = _rigged(50.0)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    free = _generate(model, ids, mask, 30, DecodeConfig())
    width = ids.shape[1]
    triggers = [[free.sequences[0, width + 4].item()], [free.sequences[1, width + 9].item()]]
    cfg = dataclasses.replace(
        _deer_config(triggers, replace=True, kv_policy=policy, kv_budget=25, kv_window=0),
        compress_every=compress_every, early_exit_answer_tokens=1, early_exit_threshold=0.0,
    )  # fmt: skip
    plain = _generate(model, ids, mask, 30, cfg)
    spec = _generate(model, ids, mask, 30, cfg, **_draft(drafter, model))
    assert torch.equal(plain.sequences, spec.sequences)
    assert spec.stats.early_exits == plain.stats.early_exits and sum(plain.stats.early_exits) > 0
    assert sum(plain.stats.evicted_tokens) > 0


# -- every mode x eviction x thinking control --------------------------------------------------------------

NEW = 20
EVICTION = {
    "none": {},
    **{p: dict(kv_policy=p, kv_budget=16, kv_window=2, kv_sinks=2, compress_every=4) for p in
       ("streaming", "h2o", "snapkv", "rkv")},
}  # fmt: skip
THINKING = ["none", "budget", "deer-append", "deer-replace"]


@functools.cache
def _matrix_case():
    """The rigged model (confident probes), ragged repetitive prompts, triggers its free decoding writes."""
    model = _rigged(50.0)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    free = _generate(model, ids, mask, NEW, DecodeConfig())
    width = ids.shape[1]
    triggers = [[free.sequences[row, width + k].item()] for row, k in ((0, 3), (1, 8), (2, 12))]
    return model, ids, mask, triggers


def _matrix_config(eviction: str, thinking: str, triggers) -> DecodeConfig:
    kv = EVICTION[eviction]
    if thinking == "none":
        return DecodeConfig(**kv)
    if thinking == "budget":
        return DecodeConfig(thinking_budget=6, think_start=None, think_end=[7], think_end_prefix=[5, 6], **kv)
    return _deer_config(triggers, replace=thinking == "deer-replace", **kv)


@functools.cache
def _plain(eviction: str, thinking: str):
    model, ids, mask, triggers = _matrix_case()
    return _generate(model, ids, mask, NEW, _matrix_config(eviction, thinking, triggers))


def test_plain_reference_of_the_matrix_matches_transformers():
    model, ids, mask, _ = _matrix_case()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(_plain("none", "none").sequences, expected)


@pytest.mark.parametrize("thinking", THINKING)
@pytest.mark.parametrize("eviction", list(EVICTION))
@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_every_drafter_eviction_and_thinking_combination_matches_plain(drafter, eviction, thinking):
    model, ids, mask, triggers = _matrix_case()
    plain = _plain(eviction, thinking)
    spec = _generate(
        model, ids, mask, NEW, _matrix_config(eviction, thinking, triggers), **_draft(drafter, model)
    )
    assert torch.equal(plain.sequences, spec.sequences)
    assert spec.stats.thinking_tokens == plain.stats.thinking_tokens
    assert spec.stats.early_exits == plain.stats.early_exits
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens
    if drafter == "draft":  # (n-gram lookup may find nothing to propose under a tight budget)
        assert sum(spec.stats.proposed_draft_tokens) > 0


def test_sampling_ignores_the_timed_draft_gate(monkeypatch):
    """Sampled output must not depend on wall-clock timings: with the timed gate claiming drafting never pays,
    a sampled speculative call still drafts, and the same seed gives the same tokens."""
    from effdecode.generation import drafters

    monkeypatch.setattr(drafters.DraftGate, "open", property(lambda self: False))
    model = tiny_model("llama", torch.float64, seed=3)
    ids, mask = repetitive_prompts(3, 12, seed=5)
    outputs = []
    for _ in range(2):
        torch.manual_seed(11)
        out = effdecode.generate(
            model, ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.8,
            assistant_model=model, num_assistant_tokens=3, return_dict_in_generate=True,
        )  # fmt: skip
        assert sum(out.stats.proposed_draft_tokens) > 0
        outputs.append(out.sequences)
    assert torch.equal(outputs[0], outputs[1])
    greedy = effdecode.generate(
        model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, assistant_model=model,
        num_assistant_tokens=3, return_dict_in_generate=True,
    )  # fmt: skip
    assert sum(greedy.stats.proposed_draft_tokens) == 0  # greedy keeps the gate (the output cannot change)
