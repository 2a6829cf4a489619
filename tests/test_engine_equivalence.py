"""Greedy effdecode is token-identical to transformers' generate (the correctness contract)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import effdecode
from tiny_models import FAMILIES, PAD, ragged_prompts, tiny_model


def assert_same_generation(model, input_ids, mask, **kwargs):
    expected = model.generate(input_ids, attention_mask=mask, **kwargs)
    actual = effdecode.generate(model, input_ids, attention_mask=mask, **kwargs)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    return actual


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_matches_hf(family, dtype, batch):
    model = tiny_model(family, dtype, seed=batch)
    input_ids, mask = ragged_prompts(batch, max_len=9, seed=batch)
    assert_same_generation(model, input_ids, mask, max_new_tokens=24, do_sample=False)


def _eos_ids_ending_rows_at_different_steps(sequences: torch.Tensor, prompt_width: int) -> list[int]:
    """Tokens that first appear at different steps in different rows of an EOS-free generation."""
    chosen: list[int] = []
    for row, step in enumerate([3, 7, 12]):
        if row < sequences.shape[0]:
            chosen.append(int(sequences[row, prompt_width + step]))
    return sorted(set(chosen))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_stop_at_different_steps_with_several_eos_ids(family):
    model = tiny_model(family, torch.float32, seed=11)
    input_ids, mask = ragged_prompts(6, max_len=8, seed=5)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    eos_ids = _eos_ids_ending_rows_at_different_steps(free_run, input_ids.shape[1])
    assert len(eos_ids) >= 2
    out = assert_same_generation(
        model, input_ids, mask, max_new_tokens=20, do_sample=False, eos_token_id=eos_ids
    )
    generated = out[:, input_ids.shape[1] :]
    finished_at = [next((i for i, t in enumerate(row.tolist()) if t in eos_ids), None) for row in generated]
    assert len({f for f in finished_at if f is not None}) >= 2, finished_at  # rows really stopped apart


def test_return_dict_stats_and_scores_match_hf():
    model = tiny_model("qwen2", torch.float64, seed=3)
    input_ids, mask = ragged_prompts(4, max_len=6, seed=2)
    kwargs = dict(
        max_new_tokens=10,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    expected = model.generate(input_ids, attention_mask=mask, **kwargs)
    actual = effdecode.generate(model, input_ids, attention_mask=mask, **kwargs)
    assert isinstance(actual, type(expected).__mro__[0]) or isinstance(actual, type(expected))
    torch.testing.assert_close(actual.sequences, expected.sequences, rtol=0, atol=0)
    assert len(actual.scores) == len(expected.scores) == 10
    for mine, theirs in zip(actual.scores, expected.scores, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(actual.logits, expected.logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    stats = actual.stats
    assert isinstance(stats, effdecode.GenerationStats)
    assert stats.target_forwards == 10  # prefill + 9 decode steps (the 10th token needs no forward)
    assert stats.new_tokens == [10, 10, 10, 10]
    assert stats.kv_peak_tokens == 6 + 9
    geometry_bytes = 2 * 2 * 2 * 16 * 8  # K and V, 2 layers, 2 kv heads, head_dim 16, float64
    assert stats.kv_peak_bytes == 4 * (6 + 10) * geometry_bytes
    assert stats.wall_time_s > 0


def test_repetition_penalty_min_new_tokens_and_max_length_match_hf():
    model = tiny_model("llama", torch.float64, seed=4)
    input_ids, mask = ragged_prompts(5, max_len=7, seed=4)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(free_run[0, 7 + 1])  # would end row 0 after 2 tokens
    assert_same_generation(
        model, input_ids, mask, max_new_tokens=12, repetition_penalty=1.3, eos_token_id=eos
    )
    assert_same_generation(model, input_ids, mask, max_new_tokens=12, min_new_tokens=6, eos_token_id=eos)
    assert_same_generation(model, input_ids, mask, max_length=15, eos_token_id=eos)
    assert_same_generation(model, input_ids, mask, eos_token_id=eos)  # HF's default length


def test_num_return_sequences_matches_hf():
    model = tiny_model("mistral", torch.float32, seed=6)
    input_ids, mask = ragged_prompts(2, max_len=5, seed=6)
    # top_k=1 makes sampling deterministic, so the expanded rows can be compared token for token.
    out = assert_same_generation(
        model, input_ids, mask, max_new_tokens=8, num_return_sequences=3, do_sample=True, top_k=1
    )
    assert out.shape[0] == 6


class _BanToken(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.tensor([self.token]), float("-inf"))


class _StopAfterToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_user_logits_processor_and_stopping_criteria_match_hf():
    model = tiny_model("qwen3", torch.float64, seed=8)
    input_ids, mask = ragged_prompts(4, max_len=6, seed=8)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    banned = int(free_run[1, 6 + 2])
    stopper = int(free_run[2, 6 + 4])
    out = assert_same_generation(
        model,
        input_ids,
        mask,
        max_new_tokens=10,
        logits_processor=LogitsProcessorList([_BanToken(banned)]),
        stopping_criteria=StoppingCriteriaList([_StopAfterToken(stopper)]),
    )
    assert not (out[:, 6:] == banned).any()
    # With an EOS id, transformers pads rows that a criterion ended; effdecode drops them from the batch.
    out = assert_same_generation(
        model,
        input_ids,
        mask,
        max_new_tokens=10,
        eos_token_id=int(free_run[3, 6 + 8]),
        stopping_criteria=StoppingCriteriaList([_StopAfterToken(stopper)]),
    )
    assert (out[2, 6 + 5 :] == PAD).all()


def test_greedy_through_patched_generate_matches_original():
    model = tiny_model("llama", torch.float32, seed=9)
    input_ids, mask = ragged_prompts(3, max_len=6, seed=9)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=9)
    with effdecode.patched(model):
        assert model.generate is not type(model).generate
        actual = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=9, return_dict_in_generate=True
        )
    assert isinstance(actual.stats, effdecode.GenerationStats)
    torch.testing.assert_close(actual.sequences, expected, rtol=0, atol=0)


def test_inferred_attention_mask_from_pad_token():
    model = tiny_model("qwen2", torch.float64, seed=12)
    input_ids, mask = ragged_prompts(4, max_len=7, seed=12)
    assert (input_ids[mask == 0] == PAD).all()
    expected = model.generate(input_ids, max_new_tokens=6)
    actual = effdecode.generate(model, input_ids, max_new_tokens=6)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_with_the_triton_attention_kernel_matches_hf(family, monkeypatch):
    """The engine end to end on the Triton kernel (the interpreter on CPU): ragged prefill, decode, rows
    leaving the batch."""
    from effdecode.kernels import slot_attention as triton_module

    calls = []
    kernel = triton_module.slot_attention_triton
    monkeypatch.setattr(
        triton_module,
        "slot_attention_triton",
        lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs),
    )
    model = tiny_model(family, torch.float32, seed=41)
    input_ids, mask = ragged_prompts(4, max_len=7, seed=41)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=8)
    eos = int(free_run[1, 7 + 3])
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    actual = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=8,
        eos_token_id=eos,
        decode_config=effdecode.DecodeConfig(attn_backend="triton"),
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert len(calls) >= 2 * 2  # every layer of prefill and decode went through Triton
