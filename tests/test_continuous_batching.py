"""Continuous batching (``DecodeConfig(max_slots=...)``): with fewer KV slots than rows, waiting rows are
admitted into freed slots; every mode returns exactly the tensor it returns without ``max_slots``, and each
row what it decodes alone."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from test_loop import _copies_per_step, host_copies  # noqa: F401 (a fixture)
from test_speculative import repetitive_prompts
from test_thought_compression import _deer_config, _rigged
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import effdecode
import effdecode.api as api
from effdecode import DecodeConfig
from effdecode.generation import slots as slots_module
from effdecode.generation.graphs import graphs_of, release_graphs
from effdecode.generation.target import TargetModel
from tiny_models import PAD, ragged_prompts, tiny_model

ROWS = 6
NEW = 24
EOS = 83  # a token the rows below emit at different steps (some rows never do)
SMALL_KV = dict(kv_budget=16, kv_window=4, kv_sinks=2, compress_every=4, kv_protect_prompt=False)
BUDGET = dict(thinking_budget=5, think_start=None, think_end=[7], think_end_prefix=[5, 6])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", torch.float64)


@pytest.fixture(scope="module")
def prompts():
    return repetitive_prompts(ROWS, 10, seed=5)


def _generate(model, ids, mask, config: DecodeConfig, slots, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may fall back (speculation stays on)
        return effdecode.generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
            return_dict_in_generate=True,
            decode_config=dataclasses.replace(config, max_slots=slots),
            **kwargs,
        )


def _check_mode(model, prompts, config, kwargs, alone_rows=(4,)):
    """max_slots in {1, 3, B} gives the tensor (and per-row stats) of no max_slots; some rows alone too."""
    ids, mask = prompts
    base = _generate(model, ids, mask, config, None, **kwargs)
    assert base.stats.slots == ROWS
    for slots in (1, 3, ROWS):
        out = _generate(model, ids, mask, config, slots, **kwargs)
        assert out.stats.slots == slots
        assert torch.equal(out.sequences, base.sequences), slots
        for name in ("new_tokens", "thinking_tokens", "evicted_tokens", "early_exits"):
            assert getattr(out.stats, name) == getattr(base.stats, name), (slots, name)
        if "assistant_model" not in kwargs and "prompt_lookup_num_tokens" not in kwargs:
            # (with drafts a row's forwards depend on its batch: the draft gate and probes are per batch)
            assert out.stats.target_row_forwards == base.stats.target_row_forwards, slots
    width = ids.shape[1]
    for row in alone_rows:
        length = int(mask[row].sum())
        alone = _generate(model, ids[row : row + 1, width - length :], None, config, None, **kwargs)
        count = base.stats.new_tokens[row]
        assert alone.stats.new_tokens[0] == count
        assert torch.equal(
            alone.sequences[0, length : length + count], base.sequences[row, width : width + count]
        )
    return base


def test_rows_finish_at_different_steps(model, prompts):
    base = _check_mode(model, prompts, DecodeConfig(), {}, alone_rows=range(ROWS))
    assert len(set(base.stats.new_tokens)) >= 3  # ragged finishes: admissions happen mid-run


MODES = {
    "ngram": (DecodeConfig(), lambda m: dict(prompt_lookup_num_tokens=3)),
    "draft": (
        DecodeConfig(),
        lambda m: dict(assistant_model=tiny_model("llama", torch.float64, seed=1), num_assistant_tokens=3),
    ),
    "perfect_draft": (DecodeConfig(), lambda m: dict(assistant_model=m)),
    **{
        policy: (DecodeConfig(kv_policy=policy, **SMALL_KV), lambda m: {})
        for policy in ("streaming", "h2o", "snapkv", "rkv")
    },
    "snapkv_draft": (DecodeConfig(kv_policy="snapkv", **SMALL_KV), lambda m: dict(assistant_model=m)),
    "thinking_budget": (DecodeConfig(**BUDGET), lambda m: {}),
    "thinking_budget_ngram": (DecodeConfig(**BUDGET), lambda m: dict(prompt_lookup_num_tokens=3)),
    "budget_kv_think_only": (
        DecodeConfig(**BUDGET, kv_think_only=True, kv_policy="h2o", **SMALL_KV),
        lambda m: {},
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_matches_without_slots_and_alone(model, prompts, mode):
    config, kwargs = MODES[mode]
    base = _check_mode(model, prompts, config, kwargs(model))
    if config.kv_budget is not None:
        assert sum(base.stats.evicted_tokens) > 0  # the budget really evicts
    if config.thinking_budget is not None:
        assert max(base.stats.thinking_tokens) == config.thinking_budget


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("drafter", ["none", "ngram", "perfect"])
def test_deer_early_exit_matches_without_slots_and_alone(prompts, replace, drafter):
    rigged = _rigged(50.0)
    ids, mask = prompts
    free = effdecode.generate(rigged, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    width = ids.shape[1]
    triggers = [[free[row, width + k].item()] for row in range(ROWS) for k in (3, 9)]
    kwargs = {"none": {}, "ngram": dict(prompt_lookup_num_tokens=3), "perfect": dict(assistant_model=rigged)}
    base = _check_mode(rigged, prompts, _deer_config(triggers, replace), kwargs[drafter])
    assert sum(base.stats.early_exits) > 0


def test_rolled_back_probes_match_without_slots(prompts):
    """Probes that are never confident (threshold 1 on a flat model) roll back: the same with admissions."""
    rigged = _rigged(0.3)
    ids, mask = prompts
    free = effdecode.generate(rigged, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    width = ids.shape[1]
    triggers = [[free[row, width + 4].item()] for row in range(ROWS)]
    config = dataclasses.replace(_deer_config(triggers), early_exit_threshold=1.0)
    base = _check_mode(rigged, prompts, config, {})
    assert sum(base.stats.early_exits) == 0


def test_admitted_rows_are_prefilled_together_in_one_forward(model, monkeypatch):
    """Without EOS every row of a wave finishes at once: the next wave is admitted in one prefill."""
    calls = []
    original = TargetModel.prefill

    def recording(self, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TargetModel, "prefill", recording)
    ids, mask = ragged_prompts(7, 6, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    base = effdecode.generate(model, ids, **kwargs)
    assert calls == [7]
    calls.clear()
    out = effdecode.generate(model, ids, decode_config=DecodeConfig(max_slots=3), **kwargs)
    assert calls == [3, 3, 1]
    assert torch.equal(out.sequences, base.sequences)
    # a prefill (first token) and 4 steps per wave: three waves one after another, against one
    assert out.stats.target_forwards == 3 * (1 + 4)
    assert base.stats.target_forwards == 1 + 4


def test_stats_and_finished_callback(model, prompts, monkeypatch):
    ids, mask = prompts
    finished: list[np.ndarray] = []
    counts: dict[int, int] = {}
    original = api.build_request

    def heard(rows: np.ndarray, new_tokens: np.ndarray) -> None:
        finished.append(rows.copy())
        counts.update(zip(rows.tolist(), new_tokens.tolist(), strict=True))

    def with_callback(*args, **kwargs):
        request = original(*args, **kwargs)
        return dataclasses.replace(request, on_rows_finished=heard)

    monkeypatch.setattr(api, "build_request", with_callback)
    stats = _generate(model, ids, mask, DecodeConfig(), 2).stats
    assert stats.slots == 2
    order = np.concatenate(finished)
    assert sorted(order.tolist()) == list(range(ROWS))  # each row once
    assert all(batch.dtype == np.int64 for batch in finished)
    assert [counts[row] for row in range(ROWS)] == stats.new_tokens  # each row's count as it left
    first, done = np.array(stats.first_token_s), np.array(stats.finish_s)
    assert len(first) == len(done) == ROWS
    assert (first > 0).all() and (first <= done).all()
    # rows 0 and 1 start at once; the others wait for a slot, so they start after some row finished
    assert first[2:].min() >= done.min()
    assert np.all(np.diff(done[order]) >= 0)  # the callback hears of rows in the order they finish


def test_sampling_uses_per_request_streams():
    """With max_slots, a fixed seed gives the same tensor for any slot count, and a row samples the same
    tokens in a smaller batch (its stream depends on its row index only, not on its batch, slot or
    admission). Without max_slots the CPU draws as transformers does (one multinomial over the batch)."""
    sampler = tiny_model("qwen2", torch.float32, seed=22)
    ids, mask = ragged_prompts(8, max_len=6, seed=22)
    kwargs = dict(do_sample=True, max_new_tokens=16, top_k=0, temperature=1.5, eos_token_id=5, pad_token_id=0)
    outputs = {}
    for slots in (8, 2, 3, 1):
        torch.manual_seed(7)
        outputs[slots] = effdecode.generate(
            sampler, ids, attention_mask=mask, decode_config=DecodeConfig(max_slots=slots), **kwargs
        )
    for slots in (2, 3, 1):
        assert torch.equal(outputs[slots], outputs[8]), slots
    torch.manual_seed(7)
    prefix = effdecode.generate(
        sampler, ids[:3], attention_mask=mask[:3], decode_config=DecodeConfig(max_slots=3), **kwargs
    )
    assert torch.equal(prefix, outputs[8][:3, : prefix.shape[1]])
    torch.manual_seed(8)
    other = effdecode.generate(
        sampler, ids, attention_mask=mask, decode_config=DecodeConfig(max_slots=2), **kwargs
    )
    assert not torch.equal(other, outputs[8])


def test_sampling_without_max_slots_draws_as_transformers():
    """Rows that all run to the end: a seeded effdecode call gives transformers' own sampled tokens."""
    sampler = tiny_model("qwen2", torch.float64, seed=22)
    ids, mask = ragged_prompts(4, max_len=6, seed=22)
    kwargs = dict(do_sample=True, max_new_tokens=10, top_k=0, temperature=1.5, pad_token_id=0)
    torch.manual_seed(7)
    expected = sampler.generate(ids, attention_mask=mask, eos_token_id=None, **kwargs)
    torch.manual_seed(7)
    ours = effdecode.generate(sampler, ids, attention_mask=mask, eos_token_id=None, **kwargs)
    assert torch.equal(ours, expected)


class _Nudge(LogitsProcessor):
    """Favours token 50 a little and records the batch it sees."""

    def __init__(self):
        self.shapes = set()

    def __call__(self, input_ids, scores):
        self.shapes.add(input_ids.shape[0])
        return scores + (torch.arange(scores.shape[1]) == 50).to(scores.dtype)


class _StopAt50(StoppingCriteria):
    def __init__(self):
        self.shapes = set()

    def __call__(self, input_ids, scores, **kwargs):
        self.shapes.add(input_ids.shape[0])
        return input_ids[:, -1] == 50


def test_user_hooks_see_the_whole_batch(model, prompts):
    """Processors and criteria see ``[B, T]`` (row i always request i) and end rows as without max_slots."""
    ids, mask = prompts
    results = []
    for slots in (None, 2):
        processor, criterion = _Nudge(), _StopAt50()
        out = _generate(
            model, ids, mask, DecodeConfig(), slots, logits_processor=LogitsProcessorList([processor]),
            stopping_criteria=StoppingCriteriaList([criterion]),
        )  # fmt: skip
        assert processor.shapes == criterion.shapes == {ROWS}
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    assert results[0].stats.new_tokens == results[1].stats.new_tokens


def test_repetition_penalty_and_return_sequences(model, prompts):
    ids, mask = prompts
    base = _generate(model, ids, mask, DecodeConfig(), None, repetition_penalty=1.3)
    out = _generate(model, ids, mask, DecodeConfig(), 2, repetition_penalty=1.3)
    assert torch.equal(out.sequences, base.sequences)
    kwargs = dict(attention_mask=mask[:3], max_new_tokens=10, do_sample=True, num_return_sequences=2)
    torch.manual_seed(3)  # 3 prompts x 2 sequences: 6 rows in 6 slots, then in 3
    first = effdecode.generate(model, ids[:3], decode_config=DecodeConfig(max_slots=6), **kwargs)
    torch.manual_seed(3)
    second = effdecode.generate(model, ids[:3], decode_config=DecodeConfig(max_slots=3), **kwargs)
    assert torch.equal(first, second)


def test_replayed_steps_pad_buckets_with_unused_slots(model, prompts):
    ids, mask = prompts
    base = _generate(model, ids, mask, DecodeConfig(), None)
    for slots in (1, 3):
        out = _generate(model, ids, mask, DecodeConfig(cuda_graphs=True), slots)
        assert torch.equal(out.sequences, base.sequences)


def test_no_transformers_cache_once_slots_are_reused(model, prompts):
    ids, mask = prompts
    assert _generate(model, ids, mask, DecodeConfig(), 2).past_key_values is None
    assert _generate(model, ids, mask, DecodeConfig(), ROWS).past_key_values is not None


def test_auto_sizes_slots_from_free_memory(model, prompts, monkeypatch):
    ids, mask = prompts
    request = effdecode.generation.request.build_request(
        model, ids, mask, dict(max_new_tokens=NEW), DecodeConfig(max_slots="auto")
    )
    capacity = slots_module.row_layout(request)[1]
    assert capacity == 10 + NEW  # prompt + new tokens (no lookahead without drafts)
    per_row = capacity * 2 * 2 * 2 * 16 * 8  # entries x (K, V) x layers x kv heads x head_dim x float64
    assert slots_module.row_bytes(model, request.decode_config, capacity) == per_row
    assert slots_module.slots_for(model, request, free_bytes=per_row * 4 + 7) == 4
    assert slots_module.slots_for(model, request, free_bytes=per_row * 100) == ROWS  # clamped to B
    with pytest.raises(ValueError, match=f"one row needs {per_row:,} bytes"):
        slots_module.slots_for(model, request, free_bytes=per_row - 1)
    # with a KV budget a row costs kv_budget + compress_every entries: more rows fit in the same memory
    budget = dataclasses.replace(request.decode_config, kv_budget=12, kv_window=4, compress_every=4)
    compressed = dataclasses.replace(request, decode_config=budget)
    assert slots_module.row_layout(compressed)[1] == 16
    assert slots_module.slots_for(model, compressed, free_bytes=per_row * 4) > 4

    monkeypatch.setattr(slots_module, "free_bytes_for_slots", lambda device: per_row * 3)
    out = _generate(model, ids, mask, DecodeConfig(), "auto")
    assert out.stats.slots == 3
    assert torch.equal(out.sequences, _generate(model, ids, mask, DecodeConfig(), None).sequences)


def test_a_row_that_cannot_fit_fails_before_any_work(model, prompts, monkeypatch):
    ids, mask = prompts
    monkeypatch.setattr(slots_module, "free_bytes_for_slots", lambda device: 100)
    monkeypatch.setattr(TargetModel, "prefill", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="one row needs"):
        _generate(model, ids, mask, DecodeConfig(), "auto")


@pytest.mark.parametrize("bad", [0, -2, 1.5, "all", True])
def test_bad_max_slots(bad):
    with pytest.raises(ValueError, match="max_slots"):
        DecodeConfig(max_slots=bad)


def test_options_that_need_the_whole_batch_are_refused(model, prompts, monkeypatch):
    ids, mask = prompts
    monkeypatch.setattr(TargetModel, "prefill", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="output_scores"):
        _generate(model, ids, mask, DecodeConfig(), 2, output_scores=True)

    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with pytest.raises(ValueError, match="no EOS token id"):
        effdecode.generate(
            model, ids, attention_mask=mask, max_new_tokens=4, decode_config=DecodeConfig(max_slots=2),
            stopping_criteria=StoppingCriteriaList([Never()]),
        )  # fmt: skip


def test_compiled_steps_with_fewer_slots_than_rows(prompts):
    """Compiled steps bucket the rows and pad with unused slots: with every slot in use the cache still has
    a spare one per bucket, and the tensor is the eager one without max_slots."""
    compiled_model = tiny_model("llama", torch.float64)  # its own compiled steps, released below
    ids, mask = prompts
    eager = _generate(compiled_model, ids, mask, DecodeConfig(), None)
    try:
        out = effdecode.generate(
            compiled_model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
            pad_token_id=0, decode_config=DecodeConfig(compile=True, max_slots=2),
            return_dict_in_generate=True,
        )  # fmt: skip
        assert out.stats.compile_time_s > 0
        assert torch.equal(out.sequences, eager.sequences)
        cache = graphs_of(compiled_model).cache
        assert cache.num_slots == 3  # bucket 2 + the spare slot
        assert any(step.compiled is not None for step in graphs_of(compiled_model).steps.values())
    finally:
        release_graphs(compiled_model)


def test_steps_with_admissions_still_copy_to_the_host_once(host_copies):  # noqa: F811
    """Plain steps keep one host copy each with max_slots (the admission reads nothing back either)."""
    model = tiny_model("llama", torch.float64, seed=3)
    ids, mask = repetitive_prompts(5, 12, seed=5)
    per_step = _copies_per_step(host_copies, model, ids, mask, decode_config=DecodeConfig(max_slots=2))
    assert per_step == 1.0


@pytest.mark.parametrize("policy", ["snapkv", "rkv"])
def test_prefill_scores_count_only_each_rows_observation_window(policy):
    """Fuzz finding (case 31000626): a prompt's length was counted twice in the prefill's window test, so one
    long prompt made every row of the prefill record attention mass outside its observation window, and a
    row's evictions (and tokens) depended on the rows it was prefilled with."""
    model = tiny_model("qwen2", torch.float64, seed=31)
    prompts = [[85] * 9, [91, 12, 31, 91, 12, 31, 91], [57, 93, 64]]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt) :] = torch.tensor(prompt)
        mask[row, 9 - len(prompt) :] = 1
    config = DecodeConfig(
        kv_budget=10, kv_window=0, kv_sinks=1, compress_every=5, kv_policy=policy, kv_protect_prompt=False
    )
    kwargs = dict(max_new_tokens=25, eos_token_id=None, pad_token_id=0, do_sample=False)
    together = effdecode.generate(model, ids, attention_mask=mask, decode_config=config, **kwargs)
    for slots in (1, 2):
        slotted = dataclasses.replace(config, max_slots=slots)
        out = effdecode.generate(model, ids, attention_mask=mask, decode_config=slotted, **kwargs)
        assert torch.equal(out, together), slots
    for row, prompt in enumerate(prompts):
        alone = effdecode.generate(model, torch.tensor([prompt]), decode_config=config, **kwargs)
        assert torch.equal(alone[0, len(prompt) :], together[row, 9:]), row


@pytest.mark.parametrize("seed", [34000028, 34000294])
def test_user_processors_see_each_rows_own_history_after_late_admission(seed):
    """Fuzz findings (cases 34000028, 34000294): with max_slots, rows admitted later hold fewer new tokens;
    their view for user processors was left-filled with pad up to the longest row, and NoRepeatNGram then
    banned tokens after bigrams of pads transformers never sees. Each history length now gets its own view."""
    from effdecode.testing.fuzz_cases import make_case, run_case

    case = make_case(seed)
    assert case.decode.get("max_slots") is not None
    assert any(p["kind"] == "no_repeat_ngram" for p in case.processors)
    failures, _ = run_case(case)
    assert failures == []


def test_user_processor_views_are_transformers_own_with_late_admission():
    """A processor that records its input_ids: every row at each of its steps sees exactly what transformers'
    generate shows it (padded prompt + its new tokens), whatever the slot count."""

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.seen: dict[tuple[int, ...], int] = {}

        def __call__(self, input_ids, scores):
            for row in input_ids.tolist():
                self.seen[tuple(row)] = self.seen.get(tuple(row), 0) + 1
            return scores

    model = tiny_model("qwen2", torch.float64, seed=4)
    ids, mask = ragged_prompts(5, max_len=7, seed=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    hf = Recorder()
    expected = model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([hf]), **kwargs)
    for slots in (1, 2):
        ours = Recorder()
        out = effdecode.generate(
            model, ids, attention_mask=mask, logits_processor=LogitsProcessorList([ours]),
            decode_config=DecodeConfig(max_slots=slots), **kwargs,
        )  # fmt: skip
        assert torch.equal(out, expected), slots
        # every view transformers showed a row, ours showed it too (other rows' views may differ)
        assert set(hf.seen) <= set(ours.seen), slots
