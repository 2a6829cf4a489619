"""The compiled decode step against HF ``generate``, side by side, steady state (compilation excluded).

Run::

    pytest benchmarks/test_e2e_compile.py --benchmark-enable --benchmark-group-by=param:batch_size \\
        --benchmark-json benchmarks/results/<device>-compile-<date>.json

Engines on identical inputs (a random 4-layer, hidden-128 Qwen2, ragged prompts up to 64 tokens, 128 new
tokens, greedy): HF eager ``generate``, HF with ``cache_implementation="static"``, effdecode eager and
effdecode with ``DecodeConfig(compile=True)``. The compiled steps are compiled by a call before the timed
rounds (``stats.compile_time_s`` of the timed calls is asserted to be 0). One thread
(``torch.set_num_threads``) so that runs on a shared machine compare like with like. Targets (issue #12):
compiled >= 2.0x HF eager tokens/s at batch 8 and >= 1.5x at batch 1 on CPU.
"""

from __future__ import annotations

import pytest
import torch

import effdecode
from effdecode import DecodeConfig
from effdecode.demo import demo_prompts

PROMPT_LEN = 64
NEW_TOKENS = 128
ENGINES = ("hf", "hf_static", "effdecode", "effdecode_compiled")


def build_qwen2(device: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_qwen2("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_outputs():
    return {}


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("engine", ENGINES)
def test_compiled_generate_tokens_per_s(benchmark, model, reference_outputs, engine, batch_size):
    input_ids, mask = demo_prompts(batch_size, PROMPT_LEN, model.config.vocab_size, device=model.device)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    if engine == "hf":
        run = lambda: model.generate(input_ids, **kwargs)  # noqa: E731
    elif engine == "hf_static":
        run = lambda: model.generate(input_ids, cache_implementation="static", **kwargs)  # noqa: E731
    else:
        config = DecodeConfig(compile=engine == "effdecode_compiled")
        effdecode.generate(model, input_ids, decode_config=config, **kwargs)  # compiles, outside the timing

        def run():
            out = effdecode.generate(
                model, input_ids, decode_config=config, return_dict_in_generate=True, **kwargs
            )
            assert out.stats.compile_time_s == 0.0, "a timed call compiled"
            return out.sequences

    def timed():
        out = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    reference_outputs.setdefault(batch_size, out)
    if engine != "hf_static":  # static-cache attention rounds differently; the others must agree exactly
        assert torch.equal(out, reference_outputs[batch_size]), "engines disagree"
    new_tokens = batch_size * (out.shape[1] - PROMPT_LEN)
    benchmark.extra_info.update(
        engine=engine,
        batch_size=batch_size,
        new_tokens=new_tokens,
        device=str(model.device),
        threads=torch.get_num_threads(),
        matches_hf=bool(torch.equal(out, reference_outputs[batch_size])),
    )
    if benchmark.stats is not None:  # None under --benchmark-disable (a dry run)
        benchmark.extra_info["tokens_per_s"] = new_tokens / benchmark.stats.stats.median
