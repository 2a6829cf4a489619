"""Sampling: HF-identical warpers, the exact target distribution, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import effdecode
from effdecode.ops.sampling import SamplingParams, warp_logits
from tiny_models import ragged_prompts, tiny_model


def hf_warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    warpers = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p is not None:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(top_k=5),
        SamplingParams(top_k=1),
        SamplingParams(top_p=0.8),
        SamplingParams(top_p=0.0),
        SamplingParams(min_p=0.1),
        SamplingParams(temperature=0.6, top_k=40, top_p=0.9, min_p=0.05),
    ],
)
@pytest.mark.parametrize("vocab", [7, 1000, 151_936])
def test_warpers_match_transformers(params, vocab, fresh_seed):
    scores = torch.randn(4, vocab) * 3
    scores[0, :3] = scores[0, 0]  # ties at the top
    scores[1] = scores[1].round()  # many ties everywhere
    expected = hf_warp(scores.clone(), params)
    actual = warp_logits(scores.clone(), params)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(actual[finite], expected[finite])


def test_first_token_follows_the_warped_target_distribution():
    """4000 rows sample their first token; frequencies must match softmax(warp(logits)) within noise."""
    model = tiny_model("llama", torch.float32, seed=21, initializer_range=0.05, vocab_size=40)
    prompt = torch.randint(1, 40, (1, 5), generator=torch.Generator().manual_seed(3))
    rows = 4000
    kwargs = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].float()
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)
    expected = warp_logits(logits[None], params).softmax(-1)[0]
    torch.manual_seed(1234)
    out = effdecode.generate(model, prompt.expand(rows, -1), max_new_tokens=1, **kwargs)
    counts = torch.bincount(out[:, -1], minlength=40).double()
    observed = counts / rows
    assert counts[expected == 0].sum() == 0  # never a warped-out token
    # Each frequency within 5 standard errors of its probability.
    stderr = (expected.double() * (1 - expected.double()) / rows).sqrt()
    assert ((observed - expected.double()).abs() <= 5 * stderr + 1e-3).all(), (observed, expected)
    # and a total-variation check that a wrong temperature would fail
    assert 0.5 * (observed - expected.double()).abs().sum() < 0.03


def test_seeded_sampling_reproduces_and_seeds_differ():
    model = tiny_model("qwen2", torch.float32, seed=22)
    input_ids, mask = ragged_prompts(4, max_len=6, seed=22)
    kwargs = dict(do_sample=True, max_new_tokens=16, top_k=0, temperature=1.5)
    torch.manual_seed(7)
    first = effdecode.generate(model, input_ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    second = effdecode.generate(model, input_ids, attention_mask=mask, **kwargs)
    torch.manual_seed(8)
    third = effdecode.generate(model, input_ids, attention_mask=mask, **kwargs)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_sampling_with_min_p_and_repetition_penalty_runs_and_respects_length():
    model = tiny_model("mistral", torch.float32, seed=23)
    input_ids, mask = ragged_prompts(3, max_len=5, seed=23)
    torch.manual_seed(0)
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        do_sample=True,
        min_p=0.2,
        repetition_penalty=1.2,
        max_new_tokens=12,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (3, 5 + 12)
    assert out.stats.new_tokens == [12, 12, 12]


def test_engine_samples_with_the_triton_kernel_where_triton_runs(monkeypatch):
    """Forced Triton (the interpreter here): sampling goes through the sort-free kernel, and a seed still
    reproduces the output."""
    from effdecode.ops import sampling as sampling_ops

    calls = []
    kernel = sampling_ops.sample_tokens
    monkeypatch.setattr(
        "effdecode.generation.logits.sample_tokens", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    monkeypatch.setenv("EFFDECODE_BACKEND", "triton")
    model = tiny_model("llama", torch.float32, seed=30)
    input_ids, mask = ragged_prompts(3, max_len=5, seed=30)
    kwargs = dict(attention_mask=mask, do_sample=True, max_new_tokens=6, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    first = effdecode.generate(model, input_ids, **kwargs)
    torch.manual_seed(5)
    second = effdecode.generate(model, input_ids, **kwargs)
    assert len(calls) == 2 * 6
    assert torch.equal(first, second)
    assert first.shape == (3, 5 + 6) and (first[:, 5:] < model.config.vocab_size).all()
