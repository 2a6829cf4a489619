"""``effdecode.generate_batch`` and the patched ``model.generate_batch`` (continuous batching, issue 14).

Every request's greedy output equals ``effdecode.generate`` on its prompt alone, in every mode and slot count;
transformers' own ``generate_batch`` gives the same tokens; transformers' arguments are mapped or named in one
warning; bad input fails before any work; a failing call leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import cache

import numpy as np
import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, StoppingCriteria

import effdecode
from effdecode import batch_api
from effdecode.batch_outputs import RequestStatus, request_ids
from effdecode.config import DecodeConfig
from tiny_models import VOCAB, ragged_prompts, tiny_model

EOS = 116  # a token the tiny model writes early in some rows only, so requests end at different steps
NEW = 16
# Ragged prompts (lengths 1..6); with EOS 116 they finish after 7, 14 and 16 (max_new_tokens) tokens.
_IDS, _MASK = ragged_prompts(6, 6, seed=3)
PROMPTS = [row[mask.bool()].tolist() for row, mask in zip(_IDS, _MASK, strict=True)]

THINKING = dict(thinking_budget=3, think_start=None, think_end=[7], think_end_prefix=[5, 6])
EVICTION = dict(kv_budget=12, kv_window=4, kv_sinks=2, compress_every=4, kv_policy="h2o")
MODES = {
    "plain": ({}, {}),
    "ngram": ({}, dict(prompt_lookup_num_tokens=3)),
    "draft": ({}, dict(num_assistant_tokens=3)),
    "eviction": (EVICTION, {}),
    "thinking": (THINKING, {}),
}


@cache
def _model() -> torch.nn.Module:
    return tiny_model("llama", torch.float64, eos_token_id=EOS)


@cache
def _draft() -> torch.nn.Module:
    return tiny_model("llama", torch.float64, seed=1, eos_token_id=EOS)


def _mode(mode: str) -> tuple[dict, dict]:
    config, kwargs = MODES[mode]
    kwargs = dict(kwargs, max_new_tokens=NEW)
    if mode == "draft":
        kwargs["assistant_model"] = _draft()
    return config, kwargs


@cache
def _alone(mode: str) -> tuple[tuple[tuple[int, ...], ...], tuple]:
    """Each prompt through ``effdecode.generate`` alone: (new tokens, stats) per prompt."""
    config, kwargs = _mode(mode)
    tokens, stats = [], []
    for prompt in PROMPTS:
        out = effdecode.generate(
            _model(),
            torch.tensor([prompt]),
            return_dict_in_generate=True,
            decode_config=DecodeConfig(**config),
            **kwargs,
        )
        new = out.stats.new_tokens[0]
        tokens.append(tuple(out.sequences[0, len(prompt) : len(prompt) + new].tolist()))
        stats.append(out.stats)
    return tuple(tokens), tuple(stats)


@pytest.mark.parametrize("slots", [1, 3, None], ids=["slots1", "slots3", "all"])
@pytest.mark.parametrize("mode", list(MODES))
def test_each_request_equals_generate_on_its_prompt_alone(mode, slots):
    config, kwargs = _mode(mode)
    outputs = effdecode.generate_batch(
        _model(), PROMPTS, decode_config=DecodeConfig(**config, max_slots=slots), **kwargs
    )
    assert list(outputs) == [f"req_{i}" for i in range(len(PROMPTS))]
    expected, alone_stats = _alone(mode)
    lengths = {len(tokens) for tokens in expected}
    assert len(lengths) > 1, "the workload must have requests that end at different steps"
    for (request_id, output), prompt, tokens, stats in zip(
        outputs.items(), PROMPTS, expected, alone_stats, strict=True
    ):
        assert output.request_id == request_id
        assert output.prompt_ids == prompt
        assert tuple(output.generated_tokens) == tokens, request_id
        assert output.status == RequestStatus.FINISHED and output.is_finished() and output.error is None
        assert output.stats.new_tokens == len(tokens)
        if mode == "thinking":
            assert output.stats.thinking_tokens == stats.thinking_tokens[0]
        if mode == "eviction":
            assert output.stats.evicted_tokens == stats.evicted_tokens[0]
    if mode == "draft":
        assert sum(o.stats.proposed_draft_tokens for o in outputs.values()) > 0
        assert all(
            0 <= o.stats.accepted_draft_tokens <= o.stats.proposed_draft_tokens for o in outputs.values()
        )
    if mode == "eviction":
        assert max(o.stats.evicted_tokens for o in outputs.values()) > 0
    if mode == "thinking":
        thought = [o.stats.thinking_tokens for o in outputs.values()]
        assert max(thought) > 0 and all(t <= THINKING["thinking_budget"] for t in thought)


def test_eos_is_kept_and_padding_dropped():
    outputs = effdecode.generate_batch(_model(), PROMPTS, max_new_tokens=NEW)
    ended = [o for o in outputs.values() if len(o.generated_tokens) < NEW]
    assert ended, "some request must end at EOS before max_new_tokens"
    for output in ended:
        assert output.generated_tokens[-1] == EOS and EOS not in output.generated_tokens[:-1]
    for output in outputs.values():
        if len(output.generated_tokens) == NEW:
            assert EOS not in output.generated_tokens


def test_slot_count_defaults_to_auto_and_follows_the_config(monkeypatch):
    seen = []
    real = batch_api.run_generation

    def spy(model, request):
        seen.append(request.decode_config.max_slots)
        return real(model, request)

    monkeypatch.setattr(batch_api, "run_generation", spy)
    effdecode.generate_batch(_model(), PROMPTS[:2], max_new_tokens=2)
    effdecode.generate_batch(_model(), PROMPTS[:2], max_new_tokens=2, decode_config={"max_slots": 4})
    with effdecode.patched(_model(), DecodeConfig(max_slots=3)):
        _model().generate_batch(PROMPTS[:2], max_new_tokens=2)
    assert seen == ["auto", 4, 3]


def test_transformers_own_generate_batch_gives_the_same_tokens():
    """transformers' paged-attention continuous batching (it runs float64 on the CPU) against ours, greedy.

    Both keep EOS in ``generated_tokens`` and stop at ``max_new_tokens``; the same prompts give the same
    tokens. transformers resolves EOS from the generation config, then the model config: both hold 116 here.
    The real client path: ``model.generate_batch(inputs=..., generation_config=...)`` on a patched model.
    """
    model = tiny_model("llama", torch.float64, eos_token_id=EOS)
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    theirs = model.generate_batch(inputs=PROMPTS, generation_config=config)
    with effdecode.patched(model):
        ours = model.generate_batch(inputs=PROMPTS, generation_config=config)
    assert list(ours) == list(theirs)
    for request_id, output in theirs.items():
        assert ours[request_id].prompt_ids == output.prompt_ids
        assert ours[request_id].generated_tokens == output.generated_tokens, request_id
        assert ours[request_id].status == output.status == RequestStatus.FINISHED
    assert {len(o.generated_tokens) for o in theirs.values()} != {NEW}


def test_patched_generate_batch_maps_transformers_arguments_with_one_warning(monkeypatch):
    model = tiny_model("llama", torch.float64, eos_token_id=EOS)
    seen = []
    real = batch_api.run_generation

    def spy(model, request):
        seen.append(request.decode_config.max_slots)
        return real(model, request)

    monkeypatch.setattr(batch_api, "run_generation", spy)
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=2, num_blocks=8, return_logprobs=False)
    with effdecode.patched(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = model.generate_batch(
            PROMPTS,
            GenerationConfig(max_new_tokens=NEW, do_sample=False),
            cb_config,  # transformers' third positional argument
            record_timestamps=True,
            persistent_manager=True,
            warmup=False,
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for name in ("record_timestamps", "persistent_manager", "continuous_batching_config.num_blocks"):
        assert name in messages[0]
    assert "max_requests_per_batch" not in messages[0] and "warmup" not in messages[0]
    assert seen == [2]
    expected, _ = _alone("plain")
    assert [tuple(o.generated_tokens) for o in outputs.values()] == list(expected)


def test_default_transformers_arguments_give_no_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = effdecode.generate_batch(
            _model(),
            PROMPTS[:2],
            max_new_tokens=2,
            continuous_batching_config=ContinuousBatchingConfig(),
            record_timestamps=False,
            persistent_manager=False,
            warmup=True,
        )
    assert [str(w.message) for w in caught if "effdecode" in str(w.message)] == []
    assert sorted(outputs) == ["req_0", "req_1"]
    assert all(len(out.generated_tokens) == 2 for out in outputs.values())


def test_patch_routes_generate_batch_and_unpatch_restores_it_exactly():
    model = tiny_model("llama", torch.float64)
    original = model.generate_batch
    effdecode.patch(model)
    assert model.generate_batch.__wrapped__ is type(model).generate_batch
    effdecode.unpatch(model)
    assert "generate_batch" not in model.__dict__
    assert model.generate_batch.__func__ is original.__func__
    custom = lambda *args, **kwargs: "custom"  # noqa: E731
    model.generate_batch = custom
    with effdecode.patched(model):
        assert model.generate_batch is not custom
    assert model.generate_batch is custom


def test_sampling_seed_from_the_continuous_batching_config_reproduces_and_keeps_the_callers_rng():
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.5)
    seeded = ContinuousBatchingConfig(seed=11)
    state = torch.get_rng_state()
    first = effdecode.generate_batch(_model(), PROMPTS, continuous_batching_config=seeded, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    second = effdecode.generate_batch(_model(), PROMPTS, continuous_batching_config=seeded, **kwargs)
    assert [o.generated_tokens for o in first.values()] == [o.generated_tokens for o in second.values()]


def test_num_return_sequences_names_copies_as_transformers_does():
    outputs = effdecode.generate_batch(
        _model(), PROMPTS[:2], max_new_tokens=3, do_sample=True, num_return_sequences=3
    )
    assert list(outputs) == request_ids(2, 3)
    assert list(outputs) == [
        "req_0__child#0", "req_0__child#1", "req_0", "req_1__child#0", "req_1__child#1", "req_1",
    ]  # fmt: skip
    assert [o.prompt_ids for o in outputs.values()] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3


def test_per_request_stats_and_timings():
    outputs = effdecode.generate_batch(
        _model(), PROMPTS, max_new_tokens=NEW, assistant_model=_draft(), num_assistant_tokens=3
    )
    for output in outputs.values():
        stats = output.stats
        assert stats.new_tokens == len(output.generated_tokens)
        assert 0.0 <= stats.draft_acceptance_rate <= 1.0
        assert output.call_stats is next(iter(outputs.values())).call_stats
        start, end = output.lifespan
        assert output.created_time <= start <= end
        if stats.time_to_first_token_s is not None:  # reported by the continuous-batching engine
            assert 0.0 <= stats.time_to_first_token_s <= stats.finish_s <= output.call_stats.wall_time_s


class _Raises(StoppingCriteria):
    def __init__(self, after: int) -> None:
        self.calls = 0
        self.after = after

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("criterion failed")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_a_failing_request_leaves_the_model_and_patch_state_intact(patched):
    model = tiny_model("llama", torch.float64, eos_token_id=EOS)
    prompt = torch.tensor([PROMPTS[0]])
    reference_hf = model.generate(prompt, max_new_tokens=NEW, do_sample=False)
    if patched:
        effdecode.patch(model, DecodeConfig(attn_backend="torch"))
    before = dict(model.__dict__)
    with pytest.raises(RuntimeError, match="criterion failed"):
        effdecode.generate_batch(
            model,
            PROMPTS,
            max_new_tokens=NEW,
            stopping_criteria=[_Raises(after=3)],
            decode_config={"max_slots": 2},
        )
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[key] is value for key, value in before.items())
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW, do_sample=False), reference_hf)
    assert torch.equal(effdecode.generate(model, prompt, max_new_tokens=NEW), reference_hf)
    outputs = effdecode.generate_batch(model, PROMPTS, max_new_tokens=NEW)
    assert (
        outputs["req_0"].generated_tokens
        == reference_hf[0, prompt.shape[1] :].tolist()[: len(outputs["req_0"].generated_tokens)]
    )


_LONG = [1] * 513  # the tiny model has 512 positions


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        ([], {}, "inputs is empty"),
        (torch.tensor([[1, 2]]), {}, "list of prompts"),
        ([[1, 2], []], {}, r"inputs\[1\] is an empty prompt"),
        ([[1, "2"]], {}, "non-integer"),
        ([[1, 2.0]], {}, "non-integer"),
        ([[True, 2]], {}, "non-integer"),
        ([[1, VOCAB]], {}, "outside the model's vocabulary"),
        ([[-1, 2]], {}, "outside the model's vocabulary"),
        ([[1], _LONG], {}, "max_position_embeddings=512"),
        ([[1]], {"decode_config": {"max_slots": 0}}, "max_slots"),
        ([[1]], {"continuous_batching_config": {"max_requests_per_batch": 0}}, "max_requests_per_batch"),
        ([[1]], {"continuous_batching_config": 3}, "ContinuousBatchingConfig"),
    ],
    ids=[
        "empty-list", "tensor", "empty-prompt", "str-id", "float-id", "bool-id", "id-too-large",
        "negative-id", "too-long", "max-slots-0", "max-requests-0", "bad-cb-config",
    ],
)  # fmt: skip
def test_bad_input_is_a_value_error_before_any_work(monkeypatch, inputs, kwargs, message):
    def never(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(batch_api, "run_generation", never)
    with pytest.raises(ValueError, match=message):
        effdecode.generate_batch(_model(), inputs, max_new_tokens=2, **kwargs)


def test_numpy_and_tensor_prompts_are_accepted():
    outputs = effdecode.generate_batch(
        _model(), [np.array(PROMPTS[0]), torch.tensor(PROMPTS[1]), tuple(PROMPTS[2])], max_new_tokens=3
    )
    assert [o.prompt_ids for o in outputs.values()] == PROMPTS[:3]


def test_unsupported_options_run_transformers_generate_batch_with_one_warning(monkeypatch):
    model = tiny_model("llama", torch.float64)
    calls = []

    def hf_generate_batch(self, inputs, generation_config=None, **kwargs):
        calls.append((inputs, generation_config, kwargs))
        return {"req_0": "theirs"}

    monkeypatch.setattr(type(model), "generate_batch", hf_generate_batch)
    with effdecode.patched(model), pytest.warns(UserWarning, match="num_beams") as caught:
        out = model.generate_batch([[1, 2]], max_new_tokens=3, num_beams=2, warmup=False)
    assert out == {"req_0": "theirs"}
    assert len(caught) == 1
    ((inputs, config, kwargs),) = calls
    assert inputs == [[1, 2]] and config.num_beams == 2
    assert kwargs["max_new_tokens"] == 3 and kwargs["warmup"] is False and kwargs["progress_bar"] is False


def test_progress_bar_counts_requests_and_shows_tokens_per_s(capsys):
    outputs = effdecode.generate_batch(_model(), PROMPTS, max_new_tokens=NEW, progress_bar=True)
    err = capsys.readouterr().err
    total = sum(o.stats.new_tokens for o in outputs.values())
    assert f"Solving {len(PROMPTS)} requests" in err
    assert f"{len(PROMPTS)}/{len(PROMPTS)}" in err
    assert "tokens/s" in err and total > 0
    effdecode.generate_batch(_model(), PROMPTS, max_new_tokens=2)
    assert capsys.readouterr().err == ""


def test_progress_bar_is_driven_by_finished_rows(monkeypatch):
    counted, tokens = [], {}
    real = batch_api.ProgressBar.rows_finished

    def spy(self, rows, new_tokens):
        counted.extend(int(row) for row in rows)
        tokens.update(zip(rows.tolist(), new_tokens.tolist(), strict=True))
        return real(self, rows, new_tokens)

    monkeypatch.setattr(batch_api.ProgressBar, "rows_finished", spy)
    outputs = effdecode.generate_batch(_model(), PROMPTS, max_new_tokens=NEW, decode_config={"max_slots": 2})
    assert sorted(counted) == list(range(len(PROMPTS)))
    # the live tokens/s counts each request's tokens as it finishes
    assert [tokens[i] for i in range(len(PROMPTS))] == [o.stats.new_tokens for o in outputs.values()]


def test_config_field_names_match_transformers():
    """What transformers' users read off an output exists on ours (5.17 and 5.24 define the same fields)."""
    from transformers.generation.continuous_batching.requests import GenerationOutput

    ours = {f.name for f in dataclasses.fields(effdecode.BatchRequestOutput)}
    assert {f.name for f in dataclasses.fields(GenerationOutput)} <= ours
    assert issubclass(effdecode.BatchRequestOutput, GenerationOutput)


def test_sampled_requests_do_not_depend_on_the_slot_count():
    kwargs = dict(max_new_tokens=NEW, do_sample=True, temperature=1.3)
    seeded = ContinuousBatchingConfig(seed=5)
    runs = [
        effdecode.generate_batch(
            _model(), PROMPTS, continuous_batching_config=seeded, decode_config={"max_slots": slots}, **kwargs
        )
        for slots in (2, 8)
    ]
    assert [o.generated_tokens for o in runs[0].values()] == [o.generated_tokens for o in runs[1].values()]


@pytest.mark.slow  # about a minute in float64 on a busy 2-core machine: run with -m slow
def test_shipped_reasoner_requests_equal_generate_alone():
    from effdecode.workloads import generate_problems, load_reasoner

    model, tokenizer = load_reasoner("target", dtype=torch.float64)
    problems = generate_problems(4, levels=(1, 2, 3, 4), seed=1, split="test")
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=300)
    outputs = effdecode.generate_batch(model, prompts, decode_config={"max_slots": 2}, **ids)
    lengths = set()
    for prompt, output in zip(prompts, outputs.values(), strict=True):
        alone = effdecode.generate(model, torch.tensor([prompt]), **ids)[0, len(prompt) :].tolist()
        assert output.generated_tokens == alone[: len(output.generated_tokens)]
        lengths.add(len(output.generated_tokens))
    assert len(lengths) > 1 and min(lengths) < 300  # requests end at EOS at different steps


def test_a_model_class_without_generate_batch_gets_ours_while_patched():
    """Older transformers had no ``generate_batch``: patch adds ours, unpatch drops it."""
    model = tiny_model("llama", torch.float64, eos_token_id=EOS)
    model.__class__ = type("NoBatchLlama", (type(model),), {"generate_batch": None})
    with effdecode.patched(model):
        outputs = model.generate_batch(PROMPTS, max_new_tokens=NEW)
        expected, _ = _alone("plain")
        assert [tuple(o.generated_tokens) for o in outputs.values()] == list(expected)
    assert "generate_batch" not in model.__dict__ and model.generate_batch is None
