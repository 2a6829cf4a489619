"""Self-consistency (issue 19): answers, votes, the esc / adaptive / confidence policies, shared prefill."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_loop import host_copies  # noqa: F401, F811 (a fixture)
from test_speculative import drafter_kwargs, repetitive_prompts

import effdecode
from effdecode import DecodeConfig
from effdecode.cache import KVGeometry, SlotKVCache
from effdecode.consistency import (
    AnswerReader,
    adaptive_stops,
    beta_majority_probability,
    confidence_threshold,
    esc_stops,
    vote,
    weighted_vote,
)
from effdecode.generation import drafters as drafters_module
from effdecode.generation import shared_prefill
from effdecode.generation import step as step_module
from effdecode.generation.steps import prefill
from tiny_models import PAD, ragged_prompts, tiny_model
from tiny_tokenizer import tiny_tokenizer

EOS = list(range(100, 140))  # 40 of 320 ids end a row: rows of a few to a few tens of tokens when sampling


def _same(text):
    return "A"


def _generate(model, ids, mask, k=8, new=30, seed=0, generate_kwargs=None, **config):
    torch.manual_seed(seed)
    return effdecode.generate(
        model, ids, attention_mask=mask, do_sample=True, temperature=1.5, max_new_tokens=new,
        num_return_sequences=k, return_dict_in_generate=True, tokenizer=tiny_tokenizer(),
        decode_config=DecodeConfig(**config) if config else None, **(generate_kwargs or {}),
    )  # fmt: skip


@pytest.fixture
def per_row_draws(monkeypatch):
    """Sampling through the Triton kernel (its interpreter here): each row draws from its own Philox stream,
    so a row's tokens do not depend on which other rows are still in the batch (the CPU torch path draws
    from one generator over the batch). Rows that a policy stops are then prefixes of the full run."""
    from effdecode.ops import sampling as sampling_ops

    kernel = sampling_ops.sample_tokens
    monkeypatch.setattr("effdecode.generation.logits.resolve_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(
        "effdecode.generation.logits.sample_tokens", lambda *a, **k: kernel(*a, **k, backend="triton")
    )


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", torch.float64, seed=1, eos_token_id=EOS)


# -- decision logic on synthetic answers ---------------------------------------------------------------------


def test_esc_stops_only_when_a_completed_window_agrees():
    assert esc_stops(["7", "7", "7"], 3)
    assert not esc_stops(["7", "7"], 3)  # window not complete
    assert not esc_stops(["7", "7", "8"], 3)
    assert not esc_stops(["7", "7", None], 3)  # a missing answer never agrees
    assert esc_stops(["1", "2", "3", "5", "5", "5"], 3)  # the second window agrees
    assert not esc_stops(["5", "5", "5", "5"], 3)  # a window is judged once, when it completes
    assert esc_stops(["x"], 1)


def test_beta_majority_probability_matches_the_beta_integral():
    grid = np.linspace(0.0, 1.0, 200_001)
    for leader, runner_up in [(0, 0), (1, 0), (3, 1), (5, 4), (9, 2)]:
        density = grid**leader * (1 - grid) ** runner_up
        expected = np.trapezoid(density * (grid > 0.5), grid) / np.trapezoid(density, grid)
        assert beta_majority_probability(leader, runner_up) == pytest.approx(expected, abs=1e-4)
    assert beta_majority_probability(1, 0) == 0.75
    assert beta_majority_probability(4, 0) == 31 / 32


def test_adaptive_stops_once_the_majority_is_settled():
    assert not adaptive_stops(["3"] * 3, 0.95)  # 15/16 < 0.95
    assert adaptive_stops(["3"] * 4, 0.95)  # 31/32
    assert not adaptive_stops(["3", "4"] * 8, 0.95)  # never agrees
    assert not adaptive_stops([None] * 10, 0.5001)
    assert adaptive_stops(["3", "4", "3", "3", "3", "3", "3", "3"], 0.95)  # 7 vs 1: P = 0.98
    assert not adaptive_stops(["3", "4", "3", "4", "3", "3"], 0.95)


def test_confidence_threshold_is_a_percentile_of_the_warmup_lows():
    lows = [-3.0, -1.0, -2.0, -0.5, -4.0]
    assert confidence_threshold(lows, 1.0) == -4.0  # keep everyone as confident as the worst warm-up row
    assert confidence_threshold(lows, 0.5) == pytest.approx(np.quantile(lows, 0.5))
    assert confidence_threshold([float("inf")], 0.9) == float("-inf")


def test_weighted_vote_counts_weights_and_skips_missing_answers():
    assert weighted_vote(["a", "b", "b", None]) == ("b", 2 / 3)
    answer, share = weighted_vote(["a", "b", "b"], [0.9, 0.2, 0.2])
    assert answer == "a" and share == pytest.approx(0.9 / 1.3)
    assert weighted_vote(["a", "b"]) == ("a", 0.5)  # tie: the earlier answer
    assert weighted_vote([None, None]) == (None, 0.0)


def test_answer_readers():
    tokenizer = tiny_tokenizer()
    regex = AnswerReader(r"x(\d+)", tokenizer)
    assert regex(tokenizer.encode("ax12bx34c")) == "34"
    assert regex(tokenizer.encode("abc")) is None
    assert AnswerReader(len, tokenizer)(tokenizer.encode("abcd")) == 4
    markers = AnswerReader(([5, 6], [9]))
    assert markers([1, 5, 6, 2, 9, 5, 6, 3, 4, 9, 7]) == (3, 4)
    assert markers([5, 6, 3]) == (3,)
    assert markers([1, 2]) is None


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(answer=r"Answer: \d+"), "exactly one group"),
        (dict(answer=r"(a)(b)"), "exactly one group"),
        (dict(consistency="esc"), "needs DecodeConfig.answer"),
        (dict(answer=r"(\d)", consistency="vote"), "expected None or one of"),
        (dict(answer=r"(\d)", consistency="adaptive", consistency_threshold=0.4), r"\(0.5, 1\)"),
        (dict(answer=r"(\d)", consistency="adaptive", consistency_threshold=1.0), r"\(0.5, 1\)"),
        (dict(answer=r"(\d)", consistency="confidence", consistency_threshold=0.0), r"\(0, 1\]"),
        (dict(answer=r"(\d)", consistency="esc", consistency_threshold=0.9), "does not use it"),
        (dict(answer=r"(\d)", consistency="esc", consistency_window=0), "consistency_window"),
        (dict(answer=r"(\d)", consistency="confidence", consistency_tokens=0), "consistency_tokens"),
        (dict(answer=3), "expected a regex"),
    ],
)
def test_bad_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**fields)


def test_bad_calls_raise_before_any_work(model, monkeypatch):
    ids, mask = ragged_prompts(2, 5)
    monkeypatch.setattr(step_module, "sharing_groups", None)  # any decoding work would fail differently
    with pytest.raises(ValueError, match="num_return_sequences >= 2"):
        _generate(model, ids, mask, k=1, answer=r"(\d)", consistency="esc")
    with pytest.raises(ValueError, match="tokenizer="):
        torch.manual_seed(0)
        effdecode.generate(
            model, ids, attention_mask=mask, do_sample=True, max_new_tokens=4, num_return_sequences=2,
            decode_config=DecodeConfig(answer=_same, consistency="esc"),
        )  # fmt: skip
    with pytest.raises(ValueError, match="tokenizer="):
        effdecode.generate(
            model, ids, attention_mask=mask, do_sample=True, max_new_tokens=4, num_return_sequences=2,
            decode_config=DecodeConfig(answer=r"(\d)"),
        )  # fmt: skip
    with pytest.raises(ValueError, match="EOS token id"):
        _generate(
            model, ids, mask, k=2, generate_kwargs={"eos_token_id": None}, answer=r"(\d)", consistency="esc"
        )


# -- shared prefill ------------------------------------------------------------------------------------------


def test_shared_prefill_equals_k_separate_prefills():
    model = tiny_model("qwen2", torch.float64, seed=4)
    ids, mask = ragged_prompts(3, 9, seed=2)
    k = 4
    ids, lens = ids.repeat_interleave(k, 0), mask.sum(1).to(torch.int32).repeat_interleave(k, 0)
    geometry = KVGeometry.from_config(model.config)
    separate, shared = (SlotKVCache(geometry, 12, 16, torch.float64, torch.device("cpu")) for _ in range(2))
    from effdecode.hf_attention import routed_through_effdecode

    requests = np.arange(12)
    first, group = shared_prefill.sharing_groups(requests, k)
    assert first.tolist() == [0, 4, 8] and group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    slots = torch.arange(12)
    with routed_through_effdecode(model), torch.inference_mode():
        expected = prefill(model, separate, ids, lens, "torch")
        first_slots = torch.as_tensor(first)
        once = prefill(model, shared, ids[first], lens[first], "torch", slots=first_slots)
        logits = shared_prefill.replicate_prefill(shared, once, first_slots, slots, group, ids.shape[1])
    assert once.shape[0] == 3  # one prefill row per prompt, not 12
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared.key_buffer, separate.key_buffer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared.value_buffer, separate.value_buffer, rtol=1e-12, atol=1e-12)
    assert torch.equal(shared.cache_lens, separate.cache_lens)
    assert torch.equal(shared.positions, separate.positions)


def test_sharing_groups_only_where_rows_share_a_prompt():
    assert shared_prefill.sharing_groups(np.arange(6), 1) is None
    assert shared_prefill.sharing_groups(np.array([3, 7, 11]), 4) is None  # one row of each prompt
    first, group = shared_prefill.sharing_groups(np.array([5, 6, 7, 8]), 4)  # prompt 1 (rows 5-7), prompt 2
    assert first.tolist() == [0, 3] and group.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("drafter", [None, "draft"])
def test_shared_prefill_keeps_the_seeded_samples(model, monkeypatch, drafter):
    ids, mask = repetitive_prompts(2, 8, seed=3)
    kwargs = drafter_kwargs(drafter, model) if drafter else {}
    prefill_rows, draft_prefill_rows = [], []
    original, original_draft = step_module.TargetModel.prefill, drafters_module.prefill

    def counting(self, input_ids, *args, **kw):
        prefill_rows.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kw)

    def counting_draft(model, cache, input_ids, *args, **kw):
        draft_prefill_rows.append(input_ids.shape[0])
        return original_draft(model, cache, input_ids, *args, **kw)

    monkeypatch.setattr(step_module.TargetModel, "prefill", counting)
    monkeypatch.setattr(drafters_module, "prefill", counting_draft)
    torch.manual_seed(5)
    shared = effdecode.generate(
        model, ids, attention_mask=mask, do_sample=True, max_new_tokens=12, num_return_sequences=3, **kwargs
    )
    assert prefill_rows == [2]  # two prompts, six rows
    assert draft_prefill_rows == ([2] if drafter == "draft" else [])  # the draft model's cache too
    monkeypatch.setattr(step_module, "sharing_groups", lambda requests, k: None)
    torch.manual_seed(5)
    separate = effdecode.generate(
        model, ids, attention_mask=mask, do_sample=True, max_new_tokens=12, num_return_sequences=3, **kwargs
    )
    assert prefill_rows == [2, 6]
    assert draft_prefill_rows == ([2, 6] if drafter == "draft" else [])
    assert torch.equal(shared, separate)


# -- policies in the loop ------------------------------------------------------------------------------------


def test_answers_without_a_policy_change_nothing(model):
    ids, mask = ragged_prompts(2, 6, seed=1)
    plain = _generate(model, ids, mask)
    voted = _generate(model, ids, mask, answer=r"(\d)")
    assert torch.equal(plain.sequences, voted.sequences)
    assert plain.stats.consistency == []
    by_hand = vote(plain, r"(\d)", 8, tiny_tokenizer(), prompt_width=ids.shape[1])
    assert [v.answers for v in by_hand] == [v.answers for v in voted.stats.consistency]
    assert [v.answer for v in by_hand] == [v.answer for v in voted.stats.consistency]
    assert all(v.rows_stopped == 0 and v.tokens_spent == v.tokens_full for v in voted.stats.consistency)


def _check_stopped_rows(full, early, prefix=True, count_stopped=True):
    """Each row of ``early`` is a prefix of its ``full`` row (same per-row draws), then padding."""
    width = full.sequences.shape[1]
    early_seq = torch.nn.functional.pad(early.sequences, (0, width - early.sequences.shape[1]), value=PAD)
    spent = early.stats.new_tokens
    prompt_width = width - max(full.stats.new_tokens)
    for row, count in enumerate(spent):
        assert (early_seq[row, prompt_width + count :] == PAD).all()  # nothing after the stop
        if prefix:
            assert count <= full.stats.new_tokens[row]
            assert torch.equal(
                early_seq[row, : prompt_width + count], full.sequences[row, : prompt_width + count]
            )
    if not prefix or not count_stopped:  # (speculative rows draw differently once the batch changes)
        return
    stopped = sum(v.rows_stopped for v in early.stats.consistency)
    shorter = sum(a < b for a, b in zip(spent, full.stats.new_tokens, strict=True))
    assert stopped == shorter


@pytest.mark.parametrize("policy", ["esc", "adaptive"])
def test_agreeing_answers_stop_the_prompt(per_row_draws, model, policy):
    ids, mask = ragged_prompts(2, 6, seed=1)
    full = _generate(model, ids, mask)
    early = _generate(model, ids, mask, answer=_same, consistency=policy, consistency_window=2)
    _check_stopped_rows(full, early)
    votes = early.stats.consistency
    assert all(v.answer == "A" and v.vote_share == 1.0 for v in votes)
    assert sum(v.rows_stopped for v in votes) >= 4
    assert sum(early.stats.new_tokens) < sum(full.stats.new_tokens)
    assert all(v.tokens_full >= v.tokens_spent for v in votes)


@pytest.mark.parametrize("policy", ["esc", "adaptive"])
def test_answers_that_never_agree_run_every_row(model, policy):
    ids, mask = ragged_prompts(2, 6, seed=1)
    full = _generate(model, ids, mask)
    fresh = itertools.count()
    early = _generate(
        model, ids, mask, answer=lambda text: next(fresh), consistency=policy, consistency_window=2
    )
    assert torch.equal(full.sequences, early.sequences)
    assert all(v.rows_stopped == 0 and v.rows_run == 8 for v in early.stats.consistency)


def test_low_confidence_rows_stop_and_do_not_vote(per_row_draws, model):
    ids, mask = ragged_prompts(2, 6, seed=1)
    kwargs = dict(k=16, new=40, seed=3)
    full = _generate(model, ids, mask, **kwargs)
    early = _generate(
        model, ids, mask, answer=_same, consistency="confidence", consistency_warmup=2, consistency_tokens=2,
        consistency_threshold=1.0, **kwargs,
    )  # fmt: skip
    _check_stopped_rows(full, early)
    votes = early.stats.consistency
    assert sum(v.rows_stopped for v in votes) > 0
    for v in votes:
        for answer, weight in zip(v.answers, v.weights, strict=True):
            assert (answer is None) == (weight == 0.0)
            assert 0.0 <= weight <= 1.0


COMPOSITIONS = {
    "ngram": lambda model: drafter_kwargs("ngram", model),
    "draft": lambda model: drafter_kwargs("draft", model),
    "eviction": lambda model: dict(kv_budget=12, kv_window=4, kv_sinks=2, compress_every=4),
    "thinking": lambda model: dict(thinking_budget=4, think_start=None, think_end=[7, 8]),
}


@pytest.mark.parametrize("policy", ["esc", "adaptive", "confidence"])
@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
def test_policies_compose(request, model, policy, composition):
    plain_rows = composition in ("eviction", "thinking")
    if plain_rows:  # speculative rows draw from the verify sampler's own per-row streams already
        request.getfixturevalue("per_row_draws")
    ids, mask = repetitive_prompts(2, 8, seed=3)
    extra = COMPOSITIONS[composition](model)
    config_fields = {key: extra.pop(key) for key in list(extra) if key in DecodeConfig.__dataclass_fields__}
    consistency = dict(answer=_same, consistency=policy)
    if policy == "confidence":
        consistency.update(consistency_warmup=2, consistency_tokens=2, consistency_threshold=1.0)
    else:
        consistency.update(consistency_window=2)
    runs = []
    for fields in ({}, consistency):
        torch.manual_seed(0)
        runs.append(
            effdecode.generate(
                model, ids, attention_mask=mask, do_sample=True, temperature=1.5, max_new_tokens=30,
                num_return_sequences=8, return_dict_in_generate=True, tokenizer=tiny_tokenizer(),
                decode_config=DecodeConfig(**config_fields, **fields), **extra,
            )
        )  # fmt: skip
    full, early = runs
    # Speculative sampling's offsets depend on the batch's width, so only plain rows keep their draws.
    _check_stopped_rows(full, early, prefix=plain_rows)
    votes = early.stats.consistency
    assert len(votes) == 2
    if policy != "confidence":
        assert sum(v.rows_stopped for v in votes) > 0
    assert sum(v.tokens_spent for v in votes) == sum(min(n, 30) for n in early.stats.new_tokens)


def test_a_step_without_finished_rows_copies_to_the_host_once(host_copies):  # noqa: F811
    counter = host_copies
    model = tiny_model("llama", torch.float64, seed=3)
    ids, mask = repetitive_prompts(2, 12, seed=5)
    counts = []
    for new in (8, 20):
        for policy in ("esc", "confidence"):
            counter["n"] = 0
            torch.manual_seed(0)
            out = effdecode.generate(
                model, ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=0.3,
                eos_token_id=319, num_return_sequences=2, return_dict_in_generate=True,
                decode_config=DecodeConfig(answer=([5], []), consistency=policy),
            )  # fmt: skip
            assert max(out.stats.new_tokens) == new and min(out.stats.new_tokens) == new  # nobody left early
            counts.append((counter["n"], out.stats.target_forwards))
    for (short, short_forwards), (long, long_forwards) in zip(counts[:2], counts[2:], strict=True):
        assert (long - short) / (long_forwards - short_forwards) == 1.0


def test_row_confidence_tracks_windows_and_stops_below_the_bar():
    from effdecode.generation.consistency import RowConfidence

    confidence = RowConfidence(batch_size=3, window=2, device=torch.device("cpu"))
    rows = torch.tensor([0, 1, 2])
    logits = torch.zeros(3, 4)
    logits[0, 1] = 10.0  # row 0: its token is near-certain; rows 1, 2: a uniform pick (log 1/4)
    tokens = torch.tensor([[1], [2], [3]])
    never = torch.zeros(3, dtype=torch.bool)
    confidence.set_bar(np.arange(3), -1.0)
    confidence.observe(logits, None, tokens)
    assert not confidence.after_append(rows, torch.ones(3, dtype=torch.long), never).any()  # window not full
    confidence.observe(logits, None, tokens)
    ending = torch.tensor([False, False, True])  # row 2 ends on its own this step: not stopped
    low = confidence.after_append(rows, torch.ones(3, dtype=torch.long), ending)
    assert low.tolist() == [False, True, False]
    summary = confidence.summary(rows)
    assert summary[:, 0].tolist() == [0.0, 1.0, 0.0]
    assert summary[1, 1].item() == pytest.approx(np.log(0.25), abs=1e-5)  # lowest window mean
    assert summary[0, 2].item() > -1e-3 and summary[1, 2].item() == pytest.approx(np.log(0.25), abs=1e-5)
    # A drafted run [R, T, V]: emitted token j is scored by column (T - q_len) + j.
    confidence.observe(torch.stack([logits, logits], dim=1), torch.tensor([2, 1, 2]), tokens.repeat(1, 2))
    assert confidence.pending.shape == (3, 2)


# -- with continuous batching (max_slots) -----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["esc", "adaptive"])
def test_decided_prompts_never_start_their_waiting_rows(model, policy):
    """Rows are admitted window by window across prompts; once a prompt's answers agree, its waiting rows are
    cancelled (0 tokens, never prefilled) and the rows that ran are those of the run without max_slots."""
    ids, mask = ragged_prompts(2, 6, seed=1)
    full = _generate(model, ids, mask, max_slots=16)  # k = 8 rows per prompt, all at once, per-row streams
    early = _generate(model, ids, mask, answer=_same, consistency=policy, consistency_window=2, max_slots=4)
    votes = early.stats.consistency
    assert early.stats.slots == 4
    assert all(v.answer == "A" for v in votes)
    assert sum(v.rows_run for v in votes) < 16  # some rows never started
    spent = early.stats.new_tokens
    assert sum(spent) < sum(full.stats.new_tokens)
    _check_stopped_rows(full, early, count_stopped=False)
    never = [row for row, count in enumerate(spent) if count == 0]
    assert len(never) == 16 - sum(v.rows_run for v in votes)


@pytest.mark.parametrize("policy", ["esc", "adaptive"])
def test_with_slots_answers_that_never_agree_run_every_row(model, policy):
    ids, mask = ragged_prompts(2, 6, seed=1)
    full = _generate(model, ids, mask, max_slots=16)
    fresh = itertools.count()
    early = _generate(
        model, ids, mask, answer=lambda text: next(fresh), consistency=policy, consistency_window=2,
        max_slots=3,
    )  # fmt: skip
    assert torch.equal(full.sequences, early.sequences)
    assert all(v.rows_stopped == 0 and v.rows_run == 8 for v in early.stats.consistency)


def test_with_slots_shared_prefill_and_confidence_keep_each_row(model):
    """Admissions share prefills per prompt; the confidence policy resets a reused slot's running state."""
    ids, mask = ragged_prompts(2, 6, seed=1)
    kwargs = dict(k=6, new=20, seed=3)
    config = dict(answer=_same, consistency="confidence", consistency_warmup=2, consistency_tokens=2)
    full = _generate(model, ids, mask, **kwargs, **config, max_slots=12)
    slotted = _generate(model, ids, mask, **kwargs, **config, max_slots=5)
    _check_stopped_rows(full, slotted, prefix=False)
    assert slotted.stats.slots == 5
    plain_full = _generate(model, ids, mask, **kwargs, max_slots=12)
    plain_slotted = _generate(model, ids, mask, **kwargs, max_slots=5)
    assert torch.equal(plain_full.sequences, plain_slotted.sequences)
