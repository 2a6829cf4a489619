"""The public API: patch/unpatch, fallback, bad input, streamers, stop strings, packaging."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer, TextStreamer

import effdecode
from effdecode import cache as cache_module
from tiny_models import ragged_prompts, tiny_model
from tiny_tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_patch_unpatch_restores_the_original_generate_exactly():
    model = tiny_model("llama")
    assert "generate" not in model.__dict__
    original = model.generate
    assert effdecode.patch(model) is model
    assert model.generate.__wrapped__ is type(model).generate
    effdecode.patch(model, effdecode.DecodeConfig(attn_backend="torch"))  # re-patch only swaps the config
    effdecode.unpatch(model)
    assert "generate" not in model.__dict__
    assert model.generate.__func__ is original.__func__
    effdecode.unpatch(model)  # idempotent


def test_patch_keeps_an_instance_level_generate():
    model = tiny_model("llama")
    custom = lambda *args, **kwargs: "custom"  # noqa: E731
    model.generate = custom
    with effdecode.patched(model):
        assert model.generate is not custom
    assert model.generate is custom


def test_patched_context_uses_effdecode_and_per_call_config():
    model = tiny_model("qwen2")
    input_ids, mask = ragged_prompts(2, 5)
    with effdecode.patched(model, effdecode.DecodeConfig(attn_backend="torch")):
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=4,
            return_dict_in_generate=True,
            decode_config=effdecode.DecodeConfig(attn_backend="torch"),
        )
    assert out.stats.target_forwards == 4
    assert "generate" not in model.__dict__


def test_unsupported_argument_falls_back_with_one_warning_naming_it():
    model = tiny_model("llama", torch.float64)
    input_ids, mask = ragged_prompts(2, 5)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=5, num_beams=2)
    with effdecode.patched(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = model.generate(input_ids, attention_mask=mask, max_new_tokens=5, num_beams=2)
    ours = [w for w in caught if "effdecode" in str(w.message)]
    assert len(ours) == 1 and "num_beams" in str(ours[0].message)
    assert torch.equal(actual, expected)


def test_unsupported_model_family_falls_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    input_ids = torch.randint(0, 50, (1, 4))
    with pytest.warns(UserWarning, match="model_type 'gpt2'"):
        out = effdecode.generate(model, input_ids, max_new_tokens=3, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "shape"),
        (
            dict(input_ids=torch.tensor([[1, 2], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]])),
            "empty prompt in rows \\[1\\]",
        ),
        (dict(input_ids=torch.tensor([[1, 2, 9999]])), "outside the model's vocabulary"),
        (dict(input_ids=torch.tensor([[1, -3]])), "outside the model's vocabulary"),
        (dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(input_ids=torch.tensor([[1, 2, 3]]), stop_strings=["w3"]), "tokenizer"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer tensor"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs, message):
    model = tiny_model("llama")
    kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=message):
        effdecode.generate(model, **kwargs)


def test_kv_cache_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(cache_module, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"needs [\d,]+ bytes .* only 1,000 bytes are free"):
        effdecode.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=10)


def test_decode_config_rejects_unknown_backend():
    with pytest.raises(ValueError, match="attn_backend"):
        effdecode.DecodeConfig(attn_backend="magic")
    with pytest.raises(ValueError, match="attn_backend"):
        effdecode.patch(tiny_model("llama"), config={"attn_backend": "magic"})


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_each_token_as_transformers_sends_them():
    model = tiny_model("qwen3", torch.float64)
    input_ids = torch.randint(1, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    theirs, ours = _Recorder(), _Recorder()
    expected = model.generate(input_ids, max_new_tokens=7, streamer=theirs)
    actual = effdecode.generate(model, input_ids, max_new_tokens=7, streamer=ours)
    assert torch.equal(actual, expected) and ours.ended
    assert len(ours.chunks) == len(theirs.chunks) == 8
    for mine, hf in zip(ours.chunks, theirs.chunks, strict=True):
        assert torch.equal(mine, hf)


def test_text_streamer_prints_the_decoded_text(capsys):
    model = tiny_model("llama", torch.float64)
    tokenizer = tiny_tokenizer()
    input_ids = tokenizer("abc", return_tensors="pt").input_ids
    assert input_ids.shape == (1, 3)
    out = effdecode.generate(
        model, input_ids, max_new_tokens=6, streamer=TextStreamer(tokenizer, skip_prompt=True)
    )
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out[0, 3:])
    assert len(printed.strip()) == 6


def test_stop_strings_match_transformers():
    model = tiny_model("mistral", torch.float64, seed=31)
    tokenizer = tiny_tokenizer()
    input_ids, mask = ragged_prompts(4, 6, seed=31)
    free_run = model.generate(input_ids, attention_mask=mask, max_new_tokens=12)
    stop = tokenizer.decode(free_run[1, 6 + 3 : 6 + 5])  # a two-token stop string row 1 produces
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=12,
        stop_strings=[stop],
        tokenizer=tokenizer,
        eos_token_id=int(free_run[0, 6 + 10]),
    )
    expected = model.generate(input_ids, **kwargs)
    actual = effdecode.generate(model, input_ids, **kwargs)
    assert torch.equal(actual, expected)
    assert actual.shape[1] < 6 + 12 or (actual[1, 6 + 5 :] == 0).all()


def _python_in(cwd: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_kernels_is_a_subpackage_and_never_top_level(tmp_path):
    """Our Triton kernels import as effdecode.kernels; Hugging Face's `kernels` name stays free."""
    probe = (
        "import importlib.util, pathlib, effdecode.kernels as k; "
        "spec = importlib.util.find_spec('kernels'); "
        "ours = spec is not None and spec.origin and pathlib.Path(spec.origin).resolve().is_relative_to("
        f"pathlib.Path({str(REPO)!r})); "
        "print(k.__name__, bool(ours))"
    )
    result = _python_in(tmp_path, probe)
    if result.returncode != 0 and "No module named 'effdecode'" in result.stderr:
        pytest.skip("effdecode is not installed; run the tests after `pip install -e .`")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["effdecode.kernels", "False"]
    # From the repository root with no install step, `effdecode.kernels` still resolves to kernels/.
    result = _python_in(REPO, "import effdecode.kernels as k; print(k.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == REPO / "kernels" / "__init__.py"
