"""Sampling inside the compiled decode step (``DecodeConfig(compile=True)``, ``do_sample=True``).

A one-token compiled step warps its logits with transformers' warpers (graph constants) and draws each row's
token from the row's counter stream (:mod:`effdecode.generation.streams`), read from slot-indexed static
buffers. The eager path draws from the same streams, so a seeded call gives the same tokens either way.

CPU compilation is slow, so these tests compile few steps: one KV bucket (prompts + new tokens stay within
32 entries) and small row buckets, on a module-scoped float64 model whose steps the tests share.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LogitsProcessor, LogitsProcessorList

import effdecode
from effdecode import DecodeConfig
from effdecode.generation.compiled import samples_in_graph
from effdecode.generation.graphs import bucket_for, graphs_of, release_graphs
from effdecode.generation.request import build_request
from effdecode.generation.streams import draw
from effdecode.ops.sampling import SamplingParams, warp_logits
from tiny_models import ragged_prompts, tiny_model

WARPERS = dict(temperature=1.3, top_k=40, top_p=0.95, min_p=0.02)
PARAMS = SamplingParams(**WARPERS)


def _sample(model, ids, mask, seed: int, new: int, decode: DecodeConfig, **kwargs):
    torch.manual_seed(seed)
    options = {**WARPERS, **kwargs}
    return effdecode.generate(
        model, ids, attention_mask=mask, max_new_tokens=new, do_sample=True, return_dict_in_generate=True,
        decode_config=decode, **options,
    )  # fmt: skip


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _sampling_steps(model) -> dict:
    return {key: step for key, step in graphs_of(model).steps.items() if "sample" in key}


@pytest.fixture(scope="module")
def model():
    """float64 Qwen2 with 8 EOS ids, so sampled rows finish at different steps; its compiled steps are
    shared by the tests of this module."""
    model = tiny_model("qwen2", torch.float64, eos_token_id=[5, 17, 33, 41, 77, 101, 150, 222])
    yield model
    effdecode.unpatch(model)
    release_graphs(model)


def test_samples_in_graph_only_with_transformers_warpers(model):
    """Which calls sample in the compiled graph: compile + do_sample with only the warpers; anything that
    needs more (history, EOS blocking, user processors, returned scores) or no compile stays eager."""
    ids, mask = ragged_prompts(2, 5, seed=1)

    def request(decode=None, **kwargs):
        kwargs = {"do_sample": True, "max_new_tokens": 4, **WARPERS, **kwargs}
        return build_request(model, ids, mask, kwargs, decode or DecodeConfig(compile=True))

    assert samples_in_graph(request())
    assert samples_in_graph(request(decode=DecodeConfig(compile=True, max_slots=1)))
    assert not samples_in_graph(request(decode=DecodeConfig()))
    assert not samples_in_graph(request(do_sample=False))
    assert not samples_in_graph(request(repetition_penalty=1.2))
    assert not samples_in_graph(request(min_new_tokens=2))
    assert not samples_in_graph(request(output_scores=True))
    assert not samples_in_graph(request(logits_processor=LogitsProcessorList([_BanToken(3)])))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_draw_equals_eager_draw(device):
    """The warp and the counter-stream draw compiled (fullgraph) give the eager tokens exactly: the int64
    hash wraps the same, float64 CDFs agree; sharp and flat rows, large seeds and offsets."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=generator) * torch.linspace(0.1, 6.0, 64)[:, None]
    seeds = torch.randint(0, 2**62, (64,), generator=generator)
    offsets = torch.randint(0, 2**40, (64,), generator=generator)
    scores, seeds, offsets = scores.to(device), seeds.to(device), offsets.to(device)

    def sample(scores, seeds, offsets):
        return draw(warp_logits(scores, PARAMS), seeds, offsets)

    compiled = torch.compile(sample, fullgraph=True, dynamic=False)
    expected = sample(scores, seeds, offsets)
    assert len(set(expected.tolist())) > 10  # the rows do not all draw one token
    assert torch.equal(compiled(scores, seeds, offsets), expected)
    assert torch.equal(compiled(scores, seeds, offsets + 1), sample(scores, seeds, offsets + 1))


def test_compiled_sampling_equals_eager_streams_without_recompiling(model):
    """A seeded sampling call with rows leaving at different steps: the compiled steps draw in their graphs
    exactly the tokens of eager decoding from the same per-request streams (compile off, streams on through
    max_slots); one graph per row bucket, no graph break, nothing recompiled in steady state, on a second
    call, or with continuous batching (rows admitted into freed slots restart their slots' streams)."""
    ids, mask = ragged_prompts(3, 9, seed=5)
    eager = _sample(model, ids, mask, 2, 22, DecodeConfig(max_slots=3))
    new_tokens = eager.stats.new_tokens
    assert len(set(new_tokens)) == 3 and max(new_tokens) == 22  # rows leave, each at its own step
    # Row buckets of the steps: step j feeds the rows with more than j tokens (the first is the prefill's).
    buckets = {bucket_for(sum(n > j for n in new_tokens)) for j in range(1, 22)}
    assert len(buckets) >= 2

    breaks, graphs_before = _graph_breaks(), _compiled_graphs()
    first = _sample(model, ids, mask, 2, 22, DecodeConfig(compile=True))
    assert torch.equal(first.sequences, eager.sequences)
    steps = _sampling_steps(model)
    assert sorted(step.compiled.bucket for step in steps.values()) == sorted(buckets)  # one step each
    assert all(key[-1] == PARAMS for key in steps)  # keyed by the warpers
    assert all(step.compiled is not None for step in graphs_of(model).steps.values())
    assert len(graphs_of(model).steps) == len(steps)  # no plain (logits-only) step was needed
    assert _graph_breaks() == breaks
    assert _compiled_graphs() - graphs_before == len(steps)  # each step compiled exactly once
    assert sum(step.compiled.calls for step in steps.values()) >= 20  # ... then replayed
    assert all(step.compiled.direct_kinds == {"sample"} for step in steps.values())  # without dynamo
    assert first.stats.compile_time_s > 0

    second = _sample(model, ids, mask, 2, 22, DecodeConfig(compile=True))
    assert torch.equal(second.sequences, eager.sequences)
    other_seed = _sample(model, ids, mask, 3, 22, DecodeConfig(compile=True))
    assert not torch.equal(other_seed.sequences, eager.sequences)
    other_eager = _sample(model, ids, mask, 3, 22, DecodeConfig(max_slots=3))
    assert torch.equal(other_seed.sequences, other_eager.sequences)
    # Two slots for three rows: the third request runs in a slot another left; per-request streams.
    batched = _sample(model, ids, mask, 2, 22, DecodeConfig(compile=True, max_slots=2))
    assert torch.equal(batched.sequences, eager.sequences)
    assert _compiled_graphs() - graphs_before == len(_sampling_steps(model))
    assert second.stats.compile_time_s == 0.0 and _graph_breaks() == breaks


def test_other_warpers_get_their_own_compiled_step(model):
    """The warpers are constants of the graph: another temperature compiles its own step (same tokens as the
    eager streams), the first parameters' steps stay and are reused."""
    ids, mask = ragged_prompts(1, 6, seed=2)
    graphs_before = _compiled_graphs()
    eager = _sample(model, ids, mask, 4, 20, DecodeConfig(max_slots=1), temperature=0.7)
    out = _sample(model, ids, mask, 4, 20, DecodeConfig(compile=True), temperature=0.7)
    assert torch.equal(out.sequences, eager.sequences)
    colder = SamplingParams(**{**WARPERS, "temperature": 0.7})
    keys = [key for key in _sampling_steps(model) if key[-1] == colder]
    assert len(keys) == 1 and _compiled_graphs() - graphs_before == 1
    again = _sample(model, ids, mask, 4, 20, DecodeConfig(compile=True), temperature=0.7)
    assert torch.equal(again.sequences, eager.sequences)
    assert _compiled_graphs() - graphs_before == 1


def test_compiled_sampling_with_speculation(model):
    """A draft model proposes: verify steps compile as logits-only steps (lossless rejection sampling
    eagerly, from the verify streams, after the prefill's draw from the pipeline's); the same tokens as
    eager."""
    ids, mask = ragged_prompts(1, 6, seed=6)
    options = dict(assistant_model=copy.deepcopy(model), num_assistant_tokens=3, temperature=0.7)
    eager = _sample(model, ids, mask, 1, 16, DecodeConfig(max_slots=1), **options)
    out = _sample(model, ids, mask, 1, 16, DecodeConfig(compile=True), **options)
    assert torch.equal(out.sequences, eager.sequences)
    assert out.stats.target_forwards < sum(out.stats.new_tokens)  # drafts were accepted
    steps = graphs_of(model).steps
    verify = [step for key, step in steps.items() if key[0] == 1 and key[1] > 1]
    assert verify and all(step.compiled.calls > 0 for step in verify)
    assert all(step.compiled.direct_kinds == {"logits"} for step in verify)


class _BanToken(LogitsProcessor):
    """A user processor (not expressible in the graph): bans one token, counts its calls."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return scores.index_fill(1, torch.tensor([self.token]), float("-inf"))


def test_user_processor_falls_back_to_eager_sampling(model):
    """With a custom LogitsProcessor the compiled step returns logits and the eager pipeline processes and
    draws (the processor sees every step, its banned token never comes), from the same streams as
    compile=False."""
    ids, mask = ragged_prompts(1, 6, seed=3)
    # The banned token: the model's favourite for the first new token.
    greedy = effdecode.generate(model, ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    banned = int(greedy[0, -1])
    eager_ban, compiled_ban = _BanToken(banned), _BanToken(banned)
    plain = dict(top_k=0, temperature=2.0)  # flat: without the ban the token would come up
    eager_config, compiled_config = DecodeConfig(max_slots=1), DecodeConfig(compile=True)
    eager = _sample(model, ids, mask, 5, 20, eager_config, logits_processor=[eager_ban], **plain)
    before = set(graphs_of(model).steps)
    out = _sample(model, ids, mask, 5, 20, compiled_config, logits_processor=[compiled_ban], **plain)
    assert torch.equal(out.sequences, eager.sequences)
    assert compiled_ban.calls == eager_ban.calls == out.stats.new_tokens[0]
    assert banned not in out.sequences[0, 6:].tolist()
    new_keys = set(graphs_of(model).steps) - before
    assert new_keys and not any("sample" in key for key in new_keys)  # a logits-only compiled step ran
    assert all(graphs_of(model).steps[key].compiled.calls > 0 for key in new_keys)


def test_in_graph_draws_follow_the_warped_distribution():
    """128 rows x 26 in-graph draws from a model whose logits are the same at every position (all embeddings
    equal): token frequencies match softmax(warp(logits)) within noise, warped-out tokens never come, and
    draws are independent across steps and rows (matches as often as sum p^2: a stream that did not advance
    or rows sharing a seed would repeat tokens)."""
    model = tiny_model("llama", torch.float64, seed=21, vocab_size=40, initializer_range=0.05)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.copy_(embed[1].expand_as(embed).clone())
    params = SamplingParams(temperature=0.9, top_k=12, top_p=0.95)
    rows, new = 128, 27
    prompt = torch.full((rows, 3), 7, dtype=torch.long)
    with torch.no_grad():
        logits = model(prompt[:1]).logits[0, -1]
    expected = warp_logits(logits[None].float(), params).softmax(-1)[0].double()
    assert (expected > 0).sum() >= 6 and expected.max() < 0.5  # a spread to test against
    breaks = _graph_breaks()
    try:
        torch.manual_seed(1234)
        out = effdecode.generate(
            model, prompt, max_new_tokens=new, do_sample=True, temperature=0.9, top_k=12, top_p=0.95,
            decode_config=DecodeConfig(compile=True), return_dict_in_generate=True,
        )  # fmt: skip
        steps = _sampling_steps(model)
        assert len(steps) == 1 and next(iter(steps.values())).compiled.calls == new - 1
        assert _graph_breaks() == breaks
    finally:
        release_graphs(model)
    draws = out.sequences[:, 4:]  # the first new token is the prefill's (eager) draw
    total = draws.numel()
    counts = torch.bincount(draws.flatten(), minlength=40).double()
    observed = counts / total
    assert counts[expected == 0].sum() == 0
    stderr = (expected * (1 - expected) / total).sqrt()
    assert ((observed - expected).abs() <= 5 * stderr + 1e-3).all(), (observed, expected)
    assert 0.5 * (observed - expected).abs().sum() < 0.03
    collision = float((expected**2).sum())
    for same in (draws[:, 1:] == draws[:, :-1], draws[1:] == draws[:-1]):  # consecutive steps; neighbour rows
        rate, stderr = same.double().mean().item(), (collision * (1 - collision) / same.numel()) ** 0.5
        assert abs(rate - collision) <= 5 * stderr, (rate, collision)
