"""lm-evaluation-harness as a real client: ``HFLM.generate_until`` on a patched model equals it unpatched.

Needs the ``integrations`` extra (``pip install -e ".[integrations]"``: ``lm_eval[hf]``); skipped with that
reason where lm_eval is not installed. lm_eval's ``MultiTokenEOSCriteria`` keeps per-row state across steps
and indexes the batch by row, so it needs transformers' view of the batch: ``[B, T]`` ids, row i always row i.
"""

from __future__ import annotations

import pytest
import torch

import effdecode
from effdecode.workloads import generate_problems, load_reasoner

lm_eval_hf = pytest.importorskip(
    "lm_eval.models.huggingface", reason="lm_eval not installed: pip install -e '.[integrations]'"
)
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def reasoner():
    model, tokenizer = load_reasoner("target", dtype=torch.float32)
    return model, tokenizer


def _requests(until: list[str], count: int, max_gen_toks: int) -> list:
    problems = generate_problems(count, levels=[1], split="test", seed=11)  # ~90 tokens each
    gen_kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return [
        Instance(request_type="generate_until", doc={}, arguments=(p.prompt, dict(gen_kwargs)), idx=i)
        for i, p in enumerate(problems)
    ]


@pytest.mark.parametrize(
    "until",
    [[], ["</think>"], ["c1 r"]],
    ids=["until-empty", "until-think-end", "until-multi-token"],
)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_generate_until_patched_equals_unpatched(reasoner, batch_size, until):
    model, tokenizer = reasoner
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    requests = _requests(until, count=4, max_gen_toks=100)
    unpatched = lm.generate_until(requests)
    with effdecode.patched(model):
        patched = lm.generate_until(requests)
    assert "generate" not in model.__dict__
    assert len(patched) == len(requests) and all(isinstance(text, str) for text in patched)
    assert patched == unpatched
    if until == ["</think>"]:
        assert all("</think>" not in text for text in patched)  # cut at the stop string
    if until == ["c1 r"]:  # a stop string of several tokens, met at different steps per row
        assert len({len(text) for text in patched}) > 1 and all("c1 r" not in text for text in patched)


def test_lm_eval_criteria_on_rows_that_finish_at_different_steps(reasoner):
    """lm_eval's own stop criteria, as ``HFLM._model_generate`` builds them, on a batch whose rows finish by
    EOS at different steps (row 0 after 75 tokens, the others run on): transformers' tokens exactly.
    (Before the full-batch view, effdecode handed criteria only the live rows: IndexError in lm_eval.)"""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    model, tokenizer = reasoner
    problems = generate_problems(4, levels=[1], split="test", seed=11)
    inputs = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    width = inputs.input_ids.shape[1]
    kwargs = dict(
        max_length=width + 100, pad_token_id=tokenizer.pad_token_id, do_sample=False, use_cache=True
    )
    expected = model.generate(
        **inputs, stopping_criteria=stop_sequences_criteria(tokenizer, ["<eos>"], width, 4), **kwargs
    )
    with effdecode.patched(model):
        out = model.generate(
            **inputs, stopping_criteria=stop_sequences_criteria(tokenizer, ["<eos>"], width, 4), **kwargs
        )
    assert torch.equal(out, expected)
