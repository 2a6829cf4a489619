"""End-to-end generation throughput: effdecode vs transformers' ``generate``, side by side.

Run: ``pytest benchmarks/test_e2e_generate.py --benchmark-enable --benchmark-group-by=param:batch_size``.
Each group holds both engines on identical inputs, so pytest-benchmark's table gives the ratio directly;
``extra_info`` records tokens/s and whether the outputs matched. Target (issue #2): effdecode >= 1.5x HF's
tokens/s at batch 8 on CPU with the 4-layer, hidden-128 model.
"""

from __future__ import annotations

import pytest
import torch

import effdecode
from effdecode.demo import build_demo_model, demo_prompts

PROMPT_LEN = 128
NEW_TOKENS = 512


@pytest.fixture(scope="module")
def model():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_demo_model(num_layers=4, hidden_size=128, device=device)


@pytest.fixture(scope="module")
def reference_outputs(model):
    return {}


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("engine", ["hf", "effdecode"])
def test_generate_tokens_per_s(benchmark, model, reference_outputs, engine, batch_size):
    input_ids, mask = demo_prompts(batch_size, PROMPT_LEN, model.config.vocab_size, device=model.device)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    if engine == "hf":
        run = lambda: model.generate(input_ids, **kwargs)  # noqa: E731
    else:
        run = lambda: effdecode.generate(model, input_ids, **kwargs)  # noqa: E731

    def timed():
        out = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(timed, rounds=3, warmup_rounds=1, iterations=1)
    reference_outputs.setdefault(batch_size, out)
    assert torch.equal(out, reference_outputs[batch_size]), "engines disagree"
    new_tokens = batch_size * (out.shape[1] - PROMPT_LEN)
    benchmark.extra_info.update(
        engine=engine, batch_size=batch_size, new_tokens=new_tokens, device=str(model.device)
    )
    if benchmark.stats is not None:  # None under --benchmark-disable (a dry run)
        benchmark.extra_info["tokens_per_s"] = new_tokens / benchmark.stats.stats.mean
