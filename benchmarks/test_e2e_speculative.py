"""End-to-end: speculative effdecode vs plain effdecode vs HF ``generate``, side by side.

Run on a GPU: ``pytest benchmarks/test_e2e_speculative.py --benchmark-enable --benchmark-group-by=param``.
Workloads: repetitive text with n-gram drafting, and a draft model whose acceptance we control (a perfect
draft, a copy of the target; a partial one, the target's first half of layers, an early-exit draft at half
the cost). Each entry records tokens/s and the mean tokens a row gains per target forward (``extra_info``).
Targets (issue #4, GPU): >= 2x plain effdecode at batch 1-8 when >= 3 tokens per forward are accepted. On CPU
this is a dry run at toy sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import effdecode
from effdecode.demo import build_demo_model, demo_prompts

ON_GPU = torch.cuda.is_available()
NEW_TOKENS = 256 if ON_GPU else 24
PROMPT_LEN = 128 if ON_GPU else 16
BATCHES = [1, 4, 16, 64] if ON_GPU else [1, 4]


@pytest.fixture(scope="module")
def target():
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    return build_demo_model(
        num_layers=8 if ON_GPU else 2, hidden_size=512 if ON_GPU else 64, dtype=dtype, device=device
    )


@pytest.fixture(scope="module")
def drafts(target):
    # "partial": the target's first half of layers with its head (an early-exit draft): half the cost, and
    # it agrees with the target on part of the tokens. "perfect": a full copy (every draft accepted).
    partial = copy.deepcopy(target)
    kept = len(partial.model.layers) // 2
    partial.model.layers = torch.nn.ModuleList(partial.model.layers[:kept])
    partial.config.num_hidden_layers = kept
    return {"perfect": copy.deepcopy(target), "partial": partial}


def repetitive(batch: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, mask = demo_prompts(batch, PROMPT_LEN, vocab, device=device)
    motif = torch.arange(5, 13, device=device)
    input_ids = torch.where(mask.bool(), motif.repeat(PROMPT_LEN // 8 + 1)[:PROMPT_LEN], input_ids)
    return input_ids, mask


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("mode", ["hf", "plain", "ngram", "draft-perfect", "draft-partial"])
def test_speculative_tokens_per_s(benchmark, target, drafts, mode, batch_size):
    input_ids, mask = repetitive(batch_size, target.config.vocab_size, target.device)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    if mode == "ngram":
        kwargs["prompt_lookup_num_tokens"] = 5
    elif mode.startswith("draft"):
        kwargs.update(assistant_model=drafts[mode.split("-")[1]], num_assistant_tokens=5)

    def run():
        if mode == "hf":
            return target.generate(input_ids, **kwargs), None
        out = effdecode.generate(target, input_ids, return_dict_in_generate=True, **kwargs)
        if ON_GPU:
            torch.cuda.synchronize()
        return out.sequences, out.stats

    sequences, stats = benchmark.pedantic(run, rounds=3 if ON_GPU else 1, warmup_rounds=1 if ON_GPU else 0)
    benchmark.extra_info.update(
        mode=mode, batch_size=batch_size, new_tokens=int((sequences[:, PROMPT_LEN:] != 0).sum())
    )
    if stats is not None:
        benchmark.extra_info.update(
            tokens_per_target_forward=stats.tokens_per_target_forward,
            draft_acceptance_rate=stats.draft_acceptance_rate,
        )
        assert stats.tokens_per_target_forward >= 1.0
