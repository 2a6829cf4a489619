"""What a new user meets first: the README's Quick start, backends that cannot run here, decode_config as a
dict, and inputs transformers accepts (right padding, cache options) running where transformers runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CompileConfig

import effdecode
from effdecode.ops import backend as backend_module
from effdecode.patch_state import original_generate
from tiny_models import ragged_prompts, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_start_runs_on_cpu(capsys):
    text = README.read_text()
    match = re.search(r"<!-- quick-start:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "the README's Quick start block is marked <!-- quick-start: ... -->"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no backend warning: the example runs the engine
        exec(compile(match.group(1), "README.md:quick-start", "exec"), {})
    printed = capsys.readouterr().out
    assert "Answer:" in printed and "GenerationStats" in printed


# ------------------------------------------------------------------------- backends that cannot run here


@pytest.fixture
def fresh_backend_warnings():
    backend_module.warn_backend_fallback.cache_clear()
    yield
    backend_module.warn_backend_fallback.cache_clear()


@pytest.mark.parametrize("backend", ["cuda", "triton", "flash_attn"])
def test_a_backend_that_cannot_run_here_warns_once_and_runs_another(
    backend, fresh_backend_warnings, monkeypatch
):
    if torch.cuda.is_available():
        pytest.skip("on a GPU these backends can run")
    from effdecode.ops import flash_attention

    monkeypatch.setattr(backend_module, "cuda_extension", lambda: None)  # as on a CPU-only install
    monkeypatch.setattr(backend_module, "triton_usable", lambda: False)  # no GPU, no TRITON_INTERPRET
    monkeypatch.setattr(flash_attention, "flash_attn_module", lambda: None)
    flash_attention._warn_missing.cache_clear()
    model = tiny_model("llama")
    input_ids, mask = ragged_prompts(3, 7, seed=1, min_len=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = effdecode.generate(model, input_ids, decode_config={"attn_backend": "torch"}, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = effdecode.generate(model, input_ids, decode_config={"attn_backend": backend}, **kwargs)
        again = effdecode.generate(model, input_ids, decode_config={"attn_backend": backend}, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert f"'{backend}'" in messages[0] and ("'torch'" in messages[0] or "'auto'" in messages[0])
    assert torch.equal(out, expected) and torch.equal(again, expected)


# ------------------------------------------------------------------------------ decode_config as a dict


def test_decode_config_accepts_a_dict_everywhere():
    model = tiny_model("llama")
    input_ids, mask = ragged_prompts(2, 6, seed=2, min_len=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    config = effdecode.DecodeConfig(kv_budget=12, kv_window=4, kv_sinks=2, compress_every=2)
    fields = dict(kv_budget=12, kv_window=4, kv_sinks=2, compress_every=2)
    expected = effdecode.generate(model, input_ids, decode_config=config, **kwargs)
    assert sum(expected.stats.evicted_tokens) > 0  # the config is really in effect
    out = effdecode.generate(model, input_ids, decode_config=fields, **kwargs)
    assert (
        torch.equal(out.sequences, expected.sequences)
        and out.stats.evicted_tokens == expected.stats.evicted_tokens
    )
    with effdecode.patched(model, fields):
        out = model.generate(input_ids, **kwargs)
    assert out.stats.evicted_tokens == expected.stats.evicted_tokens
    effdecode.patch(model, fields)
    try:
        assert effdecode.patch(model, {"kv_budget": None}) is model
        out = model.generate(input_ids, **kwargs)
        assert sum(out.stats.evicted_tokens) == 0
    finally:
        effdecode.unpatch(model)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({"kv_budgett": 64}, ValueError, r"unknown field\(s\) \['kv_budgett'\]"),
        ({"kv_budget": -1}, ValueError, "kv_budget=-1"),
        ("kv_budget=64", TypeError, "DecodeConfig or a dict of its fields, got str"),
    ],
)
def test_a_bad_decode_config_is_named(value, error, message):
    model = tiny_model("llama")
    with pytest.raises(error, match=message):
        effdecode.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, decode_config=value)
    with pytest.raises(error, match=message):
        effdecode.patch(model, value)
    with pytest.raises(error, match=message):
        with effdecode.patched(model, value):
            pass
    assert "generate" not in model.__dict__  # nothing was patched


# -------------------------------------------------- inputs transformers accepts run where transformers runs


def test_right_padding_falls_back_to_transformers_with_one_warning():
    model = tiny_model("llama")
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = original_generate(model)(input_ids, **kwargs)
    with pytest.warns(UserWarning) as caught:
        out = effdecode.generate(model, input_ids, **kwargs)
    ours = [str(w.message) for w in caught if "effdecode" in str(w.message)]
    assert len(ours) == 1 and "attention_mask" in ours[0] and "right-padded" in ours[0], ours
    assert "left padding" in ours[0] and "transformers' generate" in ours[0]
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "option",
    [
        dict(cache_implementation="static"),
        dict(compile_config=CompileConfig()),
        dict(cache_implementation="dynamic"),
    ],
    ids=["static-cache", "compile-config", "dynamic-cache"],
)
def test_cache_options_are_ignored_with_one_warning(option):
    model = tiny_model("llama")
    input_ids, mask = ragged_prompts(2, 6, seed=3, min_len=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = effdecode.generate(model, input_ids, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = effdecode.generate(model, input_ids, **kwargs, **option)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert next(iter(option)) in messages[0] and "ignored" in messages[0]
    assert torch.equal(out, expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        effdecode.generate(model, input_ids, **kwargs)
    assert caught == []


@pytest.mark.parametrize("with_ids", [False, True], ids=["embeds-only", "ids-and-embeds"])
def test_inputs_embeds_run_through_the_engine_as_transformers_returns_them(with_ids, monkeypatch):
    model = tiny_model("qwen2", torch.float64, seed=9)
    input_ids, mask = ragged_prompts(3, 6, seed=9, min_len=2)
    # Soft prompts: the ids' embeddings, perturbed, so the output depends on the embeddings fed.
    embeds = model.get_input_embeddings()(input_ids) + 0.05 * torch.randn(
        *input_ids.shape,
        model.config.hidden_size,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7, do_sample=False)
    if with_ids:
        kwargs["input_ids"] = input_ids
    expected = original_generate(model)(**kwargs)
    assert expected.shape[1] == (6 + 7 if with_ids else 7)  # transformers' format
    from effdecode.generation import request as request_module

    built = []
    real_build = request_module.build_request

    def spy(*args, **kw):
        built.append(real_build(*args, **kw))
        return built[-1]

    monkeypatch.setattr("effdecode.api.build_request", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the engine runs it
        out = effdecode.generate(model, **kwargs)
        ours = effdecode.generate(model, **kwargs, return_dict_in_generate=True)
    assert built and built[0].inputs_embeds is not None
    assert torch.equal(out, expected) and torch.equal(ours.sequences, expected)
    plain = original_generate(model)(input_ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    assert not torch.equal(plain[:, -7:], expected[:, -7:])  # the embeddings, not the ids, were fed


def test_inputs_embeds_with_options_that_read_the_prompt_fall_back_with_one_warning():
    model = tiny_model("llama", torch.float64, seed=10)
    input_ids, mask = ragged_prompts(2, 5, seed=10, min_len=2)
    embeds = model.get_input_embeddings()(input_ids)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, repetition_penalty=1.3)
    expected = original_generate(model)(**kwargs)
    with pytest.warns(UserWarning, match="inputs_embeds.*repetition_penalty"):
        out = effdecode.generate(model, **kwargs)
    assert torch.equal(out, expected)
