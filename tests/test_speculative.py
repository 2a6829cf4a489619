"""Batched speculative decoding is lossless: greedy equals plain greedy token for token, sampling keeps the
target's distribution; each row accepts its own number of drafts."""

from __future__ import annotations

import copy

import pytest
import torch

import effdecode
from tiny_models import FAMILIES, ragged_prompts, tiny_model
from tiny_tokenizer import tiny_tokenizer


def repetitive_prompts(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts that repeat a short motif, so n-gram lookup finds matches."""
    input_ids, mask = ragged_prompts(batch, width, seed=seed, min_len=width // 2)
    generator = torch.Generator().manual_seed(seed)
    for row in range(batch):
        motif = torch.randint(1, 300, (3,), generator=generator)
        length = int(mask[row].sum())
        input_ids[row, width - length :] = motif.repeat(width)[:length]
    return input_ids, mask


def drafter_kwargs(kind: str, model) -> dict:
    if kind == "ngram":
        return dict(prompt_lookup_num_tokens=4)
    if kind == "perfect":
        return dict(assistant_model=copy.deepcopy(model), num_assistant_tokens=3)
    weak = tiny_model(model.config.model_type, model.dtype, seed=77, num_hidden_layers=1)
    return dict(assistant_model=weak, num_assistant_tokens=3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("drafter", ["ngram", "weak", "perfect"])
def test_greedy_speculation_equals_plain_greedy(family, batch, drafter):
    model = tiny_model(family, torch.float64, seed=batch)
    input_ids, mask = repetitive_prompts(batch, 10, seed=batch)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=24)
    eos = int(free_run[0, 10 + 9])  # ends some rows early, at different steps
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos)
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=24,
        eos_token_id=eos,
        return_dict_in_generate=True,
        **drafter_kwargs(drafter, model),
    )
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    stats = out.stats
    assert len(stats.proposed_draft_tokens) == len(stats.accepted_draft_tokens) == batch
    assert all(
        0 <= a <= p for a, p in zip(stats.accepted_draft_tokens, stats.proposed_draft_tokens, strict=True)
    )
    if drafter == "perfect":
        # A copy of the target is always right: drafts are only lost in a row's last step (cut at EOS).
        lost = [p - a for a, p in zip(stats.accepted_draft_tokens, stats.proposed_draft_tokens, strict=True)]
        assert all(0 <= n <= 3 for n in lost), lost
        assert stats.draft_forwards > 0


def test_ngram_drafts_are_accepted_on_repetitive_text():
    model = tiny_model("llama", torch.float64, seed=5)
    input_ids, mask = repetitive_prompts(4, 12, seed=5)
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=40,
        prompt_lookup_num_tokens=4,
        return_dict_in_generate=True,
    )
    assert sum(out.stats.accepted_draft_tokens) > 0
    assert out.stats.tokens_per_target_forward > 1.0


def test_perfect_draft_needs_about_new_tokens_over_k_plus_one_forwards():
    model = tiny_model("qwen3", torch.float64, seed=6)
    input_ids, mask = ragged_prompts(4, 8, seed=6)
    k, new = 4, 41
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=new,
        assistant_model=copy.deepcopy(model),
        num_assistant_tokens=k,
        return_dict_in_generate=True,
    )
    # Prefill gives the first token; each verify forward then emits k + 1 (the last one what is left).
    assert out.stats.target_forwards == 1 + -(-(new - 1) // (k + 1))
    assert out.stats.new_tokens == [new] * 4
    assert out.stats.target_row_forwards == [out.stats.target_forwards] * 4
    assert out.stats.tokens_per_target_forward == pytest.approx(new / out.stats.target_forwards)


@pytest.mark.parametrize("schedule", ["heuristic", "adaptive"])
def test_draft_length_schedules_keep_greedy_output(schedule):
    model = tiny_model("mistral", torch.float64, seed=7)
    input_ids, mask = repetitive_prompts(5, 9, seed=7)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=20)
    kwargs = (
        dict(num_assistant_tokens_schedule="heuristic")
        if schedule == "heuristic"
        else dict(decode_config=effdecode.DecodeConfig(draft_length="adaptive"))
    )
    actual = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=20,
        assistant_model=tiny_model("mistral", torch.float64, seed=8, num_hidden_layers=1),
        num_assistant_tokens=4,
        **kwargs,
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_eos_and_stop_strings_inside_an_accepted_run_end_the_row_there():
    model = tiny_model("llama", torch.float64, seed=9)
    tokenizer = tiny_tokenizer()
    input_ids, mask = ragged_prompts(4, 7, seed=9)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=16)
    stop = tokenizer.decode(free_run[1, 7 + 5 : 7 + 7])
    eos = int(free_run[2, 7 + 6])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=16, eos_token_id=eos, stop_strings=[stop], tokenizer=tokenizer
    )
    expected = model.generate(input_ids, **kwargs)
    actual = effdecode.generate(
        model, input_ids, assistant_model=copy.deepcopy(model), num_assistant_tokens=5, **kwargs
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_speculation_with_options_it_cannot_serve_warns_and_decodes_plainly():
    model = tiny_model("llama", torch.float64, seed=10)
    input_ids, mask = ragged_prompts(2, 5, seed=10)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=8, repetition_penalty=1.3)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        actual = effdecode.generate(
            model,
            input_ids,
            attention_mask=mask,
            max_new_tokens=8,
            repetition_penalty=1.3,
            prompt_lookup_num_tokens=3,
        )
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt_lookup_num_tokens=0), "draft tokens must be an integer >= 1"),
        (dict(assistant_model="vocab"), "vocabulary of 100 tokens"),
        (dict(assistant_model="dtype"), "dtype"),
        (dict(assistant_model="same", prompt_lookup_num_tokens=3), "either assistant_model or"),
    ],
)
def test_bad_speculation_arguments_raise(kwargs, message):
    model = tiny_model("llama", torch.float32)
    drafts = {
        "vocab": tiny_model("llama", torch.float32, vocab_size=100),
        "dtype": tiny_model("llama", torch.float64),
        "same": tiny_model("llama", torch.float32, seed=2),
    }
    if "assistant_model" in kwargs:
        kwargs = dict(kwargs, assistant_model=drafts[kwargs["assistant_model"]])
    with pytest.raises(ValueError, match=message):
        effdecode.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, **kwargs)


def _exact_first_two_marginals(model, prompt: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distributions of generated tokens 1 and 2 under the warped target."""
    from effdecode.ops.sampling import warp_logits

    vocab = model.config.vocab_size
    with torch.no_grad():
        first = warp_logits(model(prompt).logits[:, -1].double(), params).softmax(-1)[0]
        extended = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second_given = warp_logits(model(extended).logits[:, -1].double(), params).softmax(-1)
    return first, first @ second_given


@pytest.mark.parametrize("drafter", ["weak", "ngram"])
def test_speculative_sampling_keeps_the_target_distribution(drafter):
    """Per-position token frequencies over 3000 rows match the exact target marginals."""
    from effdecode.ops.sampling import SamplingParams

    vocab = 12
    model = tiny_model("llama", torch.float64, seed=12, vocab_size=vocab, initializer_range=0.5)
    prompt = torch.tensor([[3, 7, 3, 7, 3]])
    params = SamplingParams(temperature=0.9)
    first, second = _exact_first_two_marginals(model, prompt, params)
    rows = 3000
    if drafter == "weak":
        extra = dict(
            assistant_model=tiny_model(
                "llama", torch.float64, seed=13, vocab_size=vocab, initializer_range=0.5
            ),
            num_assistant_tokens=2,
        )
    else:
        extra = dict(prompt_lookup_num_tokens=2)
    torch.manual_seed(2024)
    out = effdecode.generate(
        model,
        prompt.expand(rows, -1),
        max_new_tokens=3,
        do_sample=True,
        temperature=0.9,
        top_k=0,
        return_dict_in_generate=True,
        **extra,
    )
    assert sum(out.stats.proposed_draft_tokens) > 0
    assert sum(out.stats.accepted_draft_tokens) < sum(out.stats.proposed_draft_tokens)  # rejections happened
    for position, exact in ((0, first), (1, second)):
        counts = torch.bincount(out.sequences[:, prompt.shape[1] + position], minlength=vocab).double()
        observed = counts / rows
        stderr = (exact * (1 - exact) / rows).sqrt()
        assert ((observed - exact).abs() <= 5 * stderr + 2e-3).all(), (position, observed, exact)
        assert 0.5 * (observed - exact).abs().sum() < 0.05


def test_draft_cache_catches_up_after_a_row_paused_drafting(monkeypatch):
    """Rows that pause fall behind in the draft's cache; on the next probe the draft must catch up fully,
    so a perfect draft is still accepted in full on every probe."""
    from effdecode.generation.drafters import DraftSchedule

    monkeypatch.setattr(DraftSchedule, "PAUSE_BELOW", 100.0)  # every row always paused: only probes draft
    model = tiny_model("qwen2", torch.float64, seed=14)
    input_ids, mask = ragged_prompts(3, 6, seed=14)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=40)
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=40,
        assistant_model=copy.deepcopy(model),
        num_assistant_tokens=3,
        return_dict_in_generate=True,
    )
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert sum(out.stats.proposed_draft_tokens) >= 3 * 3  # probes happened (steps 8, 16, 32)
    assert out.stats.accepted_draft_tokens == out.stats.proposed_draft_tokens


def test_only_drafting_rows_run_the_draft_model(monkeypatch):
    """Rows that paused drafting stay out of the draft model's forwards; output stays plain greedy."""
    from effdecode.generation.drafters import ModelDrafter

    model = tiny_model("llama", torch.float64, seed=3)
    perfect = copy.deepcopy(model)
    input_ids, mask = repetitive_prompts(4, 12, seed=5)
    seen_rows = []
    propose = ModelDrafter.propose

    def recording(self, rows, *args):
        seen_rows.append(rows.shape[0])
        return propose(self, rows, *args)

    monkeypatch.setattr(ModelDrafter, "propose", recording)
    monkeypatch.setattr(
        "effdecode.generation.drafters.DraftSchedule.wanted",
        lambda self, rows: torch.where(rows < 2, self.lengths[rows], 0),  # rows 0-1 draft, 2-3 paused
    )
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=20)
    out = effdecode.generate(
        model, input_ids, attention_mask=mask, max_new_tokens=20, assistant_model=perfect,
        num_assistant_tokens=3, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    assert seen_rows and max(seen_rows) == 2
    assert out.stats.proposed_draft_tokens[2:] == [0, 0] and sum(out.stats.accepted_draft_tokens[:2]) > 0


@pytest.mark.parametrize("drafter", ["ngram", "weak"])
def test_kv_bound_does_not_drift_with_rejected_drafts(drafter, monkeypatch):
    """The host bound the attention pads to stays within one step's columns of the rows' true lengths: the
    bounds count every fed column, then the step's kept counts correct them (rejected drafts would otherwise
    pile up as padding, step after step)."""
    from effdecode.generation.target import TargetModel

    model = tiny_model("llama", torch.float64, seed=5)
    input_ids, mask = repetitive_prompts(3, 10, seed=5)
    slack = []
    original = TargetModel.forward

    def recording(self, rows, input_ids, positions, q_lens, kv_bound, *args, **kwargs):
        true_bound = int((self.cache.cache_lens[rows.long()] + q_lens).max())
        slack.append((kv_bound - true_bound, input_ids.shape[1]))
        return original(self, rows, input_ids, positions, q_lens, kv_bound, *args, **kwargs)

    monkeypatch.setattr(TargetModel, "forward", recording)
    out = effdecode.generate(
        model, input_ids, attention_mask=mask, max_new_tokens=40, return_dict_in_generate=True,
        **drafter_kwargs(drafter, model),
    )  # fmt: skip
    assert sum(out.stats.proposed_draft_tokens) > sum(out.stats.accepted_draft_tokens)  # some were rejected
    assert all(0 <= extra < width for extra, width in slack), slack
