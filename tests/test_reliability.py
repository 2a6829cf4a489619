"""Calls a differential fuzz against transformers found broken (issue 15 items 1, 4-11): each is checked
against transformers' own ``generate`` on the same model, or for the error transformers raises."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, RepetitionPenaltyLogitsProcessor
from transformers.generation.streamers import BaseStreamer

import effdecode
from tiny_models import ragged_prompts, tiny_model

TORCH = effdecode.DecodeConfig(attn_backend="torch")


def _effdecode_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "effdecode" in str(w.message)]


def _run(model, *args, **kwargs):
    """effdecode's output and the effdecode warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = effdecode.generate(model, *args, decode_config=TORCH, **kwargs)
    return out, _effdecode_warnings(caught)


def _issue_model() -> tuple[LlamaForCausalLM, int]:
    """The issue's repro model and ``p``, its argmax after token 4."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        initializer_range=0.3,
        pad_token_id=None,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        pad = int(model(torch.tensor([[4]])).logits[0, -1].argmax())
    return model, pad


def test_repetition_penalty_on_left_padding_matches_the_installed_transformers():
    model, pad = _issue_model()
    input_ids = torch.tensor([[7, 7, 7, 3, 9], [pad, pad, pad, pad, 4]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 0, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=5, repetition_penalty=1.3, pad_token_id=pad)
    expected = model.generate(input_ids, **kwargs)
    actual, ours = _run(model, input_ids, **kwargs)
    assert not ours
    assert torch.equal(actual, expected), (actual[:, 5:], expected[:, 5:])


def test_repetition_penalty_with_padding_and_rows_leaving_matches_hf():
    model = tiny_model("qwen2", torch.float64, seed=3)
    input_ids, mask = ragged_prompts(5, 7, seed=4)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=12,
        repetition_penalty=1.7,
        eos_token_id=[5, 17, 40],
        pad_token_id=0,
    )
    expected = model.generate(input_ids, **kwargs)
    actual, _ = _run(model, input_ids, **kwargs)
    assert torch.equal(actual, expected)


def test_a_user_processor_replacing_one_generate_builds_falls_back():
    model = tiny_model("llama", torch.float64)
    input_ids, mask = ragged_prompts(2, 5)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=6,
        repetition_penalty=1.5,
        logits_processor=[RepetitionPenaltyLogitsProcessor(3.0)],
    )
    expected = model.generate(input_ids, **kwargs)
    actual, ours = _run(model, input_ids, **kwargs)
    assert len(ours) == 1 and "logits_processor" in ours[0]
    assert torch.equal(actual, expected)


def _rope_model(rope: dict, max_positions: int) -> torch.nn.Module:
    return tiny_model(
        "llama", torch.float64, seed=1, max_position_embeddings=max_positions, rope_parameters=rope
    )


_DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.5 * i for i in range(8)],
    "original_max_position_embeddings": 12,
}


@pytest.mark.parametrize("rope", [_DYNAMIC, _LONGROPE], ids=["dynamic", "longrope"])
def test_dynamic_and_longrope_past_their_limit_fall_back_with_one_warning(rope):
    model = _rope_model(rope, max_positions=16 if rope is _DYNAMIC else 48)
    input_ids, mask = ragged_prompts(4, 6, seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[7, 11, 19, 23])
    expected = model.generate(input_ids, **kwargs)
    actual, ours = _run(model, input_ids, **kwargs)
    assert len(ours) == 1 and "rope_scaling" in ours[0], ours
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("rope", [_DYNAMIC, _LONGROPE], ids=["dynamic", "longrope"])
def test_dynamic_and_longrope_within_their_limit_run_and_match_hf(rope):
    model = _rope_model(rope, max_positions=64)
    input_ids, mask = ragged_prompts(3, 5, seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=[7, 11])
    expected = model.generate(input_ids, **kwargs)
    actual, ours = _run(model, input_ids, **kwargs)
    assert not ours
    assert torch.equal(actual, expected)


class _PauseAt(BaseStreamer):
    """Pauses the generating thread at its ``at``-th token until ``resume`` is set."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.inside, self.resume = threading.Event(), threading.Event()

    def put(self, value):
        self.calls += 1
        if self.calls == self.at + 1:  # the first put is the prompt
            self.inside.set()
            assert self.resume.wait(120)

    def end(self):
        pass


def test_overlapping_calls_on_one_model_match_solo_calls_and_leave_it_unchanged():
    model = tiny_model("llama", torch.float64)
    before = model.config._attn_implementation
    ids_a, mask_a = ragged_prompts(3, 6, seed=1)
    ids_b, mask_b = ragged_prompts(2, 4, seed=2)
    kw_a = dict(attention_mask=mask_a, max_new_tokens=12, decode_config=TORCH)
    kw_b = dict(attention_mask=mask_b, max_new_tokens=8, decode_config=TORCH)
    solo_a = effdecode.generate(model, ids_a, **kw_a)
    solo_b = effdecode.generate(model, ids_b, **kw_b)
    hf_b = model.generate(ids_b, attention_mask=mask_b, max_new_tokens=8)
    with torch.no_grad():
        solo_logits = model(ids_b, attention_mask=mask_b).logits

    pause = _PauseAt(3)
    result: dict[str, object] = {}

    def call_a():
        try:
            result["a"] = effdecode.generate(model, ids_a, streamer=pause, **kw_a)
        except BaseException as error:  # reported in the main thread
            result["a"] = error
            pause.inside.set()

    thread = threading.Thread(target=call_a)
    thread.start()
    try:
        assert pause.inside.wait(120)
        # Thread A is paused inside its decode loop: everything here overlaps it.
        overlapped_b = effdecode.generate(model, ids_b, **kw_b)
        overlapped_hf = model.generate(ids_b, attention_mask=mask_b, max_new_tokens=8)
        with torch.no_grad():
            overlapped_logits = model(ids_b, attention_mask=mask_b).logits
        assert model.config._attn_implementation == before
    finally:
        pause.resume.set()
        thread.join(120)
    assert not isinstance(result["a"], BaseException), result["a"]
    assert torch.equal(result["a"], solo_a)
    assert torch.equal(overlapped_b, solo_b)
    assert torch.equal(overlapped_hf, hf_b)
    assert torch.equal(overlapped_logits, solo_logits)
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(ids_b, attention_mask=mask_b).logits, solo_logits)


def test_many_threads_generating_at_once_match_solo_calls():
    model = tiny_model("qwen3", torch.float64)
    inputs = [ragged_prompts(2 + i % 2, 5, seed=10 + i) for i in range(4)]
    solo = [
        effdecode.generate(model, ids, attention_mask=m, max_new_tokens=10, decode_config=TORCH)
        for ids, m in inputs
    ]
    barrier = threading.Barrier(len(inputs))
    outputs: list[object] = [None] * len(inputs)

    def worker(i: int) -> None:
        ids, mask = inputs[i]
        barrier.wait(60)
        try:
            outputs[i] = effdecode.generate(
                model, ids, attention_mask=mask, max_new_tokens=10, decode_config=TORCH
            )
        except BaseException as error:
            outputs[i] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for got, expected in zip(outputs, solo, strict=True):
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, expected)


def test_training_mode_with_attention_dropout_falls_back_before_any_forward():
    model = tiny_model("llama", torch.float64, attention_dropout=0.3).train()
    input_ids, mask = ragged_prompts(2, 5)
    torch.manual_seed(7)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=5)
    torch.manual_seed(7)
    actual, ours = _run(model, input_ids, attention_mask=mask, max_new_tokens=5)
    assert len(ours) == 1 and "model.train()" in ours[0] and "dropout" in ours[0]
    assert torch.equal(actual, expected)


def test_training_mode_without_dropout_runs_effdecode():
    model = tiny_model("llama", torch.float64)
    input_ids, mask = ragged_prompts(2, 5)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=5)
    actual, ours = _run(model.train(), input_ids, attention_mask=mask, max_new_tokens=5)
    assert not ours
    assert torch.equal(actual, expected)


def test_a_model_on_the_meta_device_is_a_value_error():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device"):
        effdecode.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3)


def test_eos_id_outside_the_vocabulary_with_min_new_tokens_runs_as_hf():
    model = tiny_model("mistral", torch.float64)
    input_ids, mask = ragged_prompts(3, 5)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=8, min_new_tokens=3, eos_token_id=[model.config.vocab_size + 5, 9]
    )
    expected = model.generate(input_ids, **kwargs)
    actual, ours = _run(model, input_ids, **kwargs)
    assert not ours
    assert torch.equal(actual, expected)


class _CountForwards:
    def __init__(self, model) -> None:
        self.count = 0
        model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.count += 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True, temperature=0.0),
        dict(do_sample=True, temperature=-1.0),
        dict(do_sample=True, top_k=-1),
        dict(do_sample=True, top_p=-0.5),
        dict(do_sample=True, min_p=1.5),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=2),  # transformers wants a float
    ],
)
def test_bad_sampling_parameters_raise_transformers_value_error_before_any_forward(kwargs):
    model = tiny_model("llama")
    input_ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError) as hf_error:
        model.generate(input_ids, max_new_tokens=3, **kwargs)
    forwards = _CountForwards(model)
    with pytest.raises(ValueError) as ours:
        effdecode.generate(model, input_ids, max_new_tokens=3, **kwargs)
    assert str(ours.value) == str(hf_error.value)
    assert forwards.count == 0


@pytest.mark.parametrize("num_return", [1, 3])
def test_no_input_ids_generates_from_bos_as_hf(num_return):
    model = tiny_model("qwen2", torch.float64, bos_token_id=5)
    model.generation_config.bos_token_id = 5
    # transformers samples several return sequences (greedy allows only one); same seed, same draws.
    kwargs = dict(max_new_tokens=6, num_return_sequences=num_return, do_sample=num_return > 1)
    torch.manual_seed(11)
    expected = model.generate(**kwargs)
    torch.manual_seed(11)
    actual, ours = _run(model, **kwargs)
    assert not ours
    assert actual.shape == (num_return, 7)
    assert torch.equal(actual, expected)


def test_no_input_ids_and_no_bos_is_transformers_value_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="bos_token_id"):
        effdecode.generate(model, max_new_tokens=3)


def test_returned_scores_and_logits_are_ordinary_tensors():
    model = tiny_model("llama", torch.float64)
    input_ids, mask = ragged_prompts(2, 4)
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        decode_config=TORCH,
    )
    for tensors in (out.scores, out.logits):
        assert len(tensors) == 3
        assert not any(t.is_inference() for t in tensors)
        before = tensors[0].clone()
        tensors[0].add_(1)
        assert torch.equal(tensors[0], before + 1)


def test_stop_strings_still_run_effdecode_after_the_processor_checks():
    from tiny_tokenizer import tiny_tokenizer

    model = tiny_model("llama", torch.float64, seed=31)
    input_ids, mask = ragged_prompts(3, 5, seed=31)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=8)
    tokenizer = tiny_tokenizer()
    stop = tokenizer.decode(free_run[1, 5 + 2 : 5 + 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, stop_strings=[stop], tokenizer=tokenizer)
    expected = model.generate(input_ids, **kwargs)
    actual, ours = _run(model, input_ids, **kwargs)
    assert not ours  # effdecode's own StopStringCriteria is not mistaken for a user one
    assert torch.equal(actual, expected)
