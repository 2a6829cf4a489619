"""The roofline byte model of ``benchmarks/roofline.py``: parameter counts, KV bytes, model building."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from effdecode.cache import KVGeometry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import roofline  # noqa: E402


def _meta_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


@pytest.mark.parametrize(
    "config",
    [
        roofline.qwen2_config("toy"),
        roofline.qwen2_config("toy", tie_word_embeddings=False, num_key_value_heads=4),
        roofline.qwen2_config("toy", head_dim=24),  # head_dim not hidden / heads
        LlamaConfig(
            vocab_size=300,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),
        LlamaConfig(
            vocab_size=300,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
    ],
    ids=["qwen2-tied", "qwen2-untied-mha", "qwen2-head-dim", "llama-gqa", "llama-biases"],
)
def test_parameter_count_matches_the_model(config):
    assert roofline.parameter_count(config) == _meta_count(config)


@pytest.mark.parametrize("name", ["0.5B", "1.5B", "7B"])
def test_qwen25_shapes_match_published_sizes(name):
    """The shapes give the parameter counts the Qwen2.5 model cards publish (0.49B, 1.54B, 7.61B)."""
    config = roofline.qwen2_config(name)
    published = {"0.5B": 0.49e9, "1.5B": 1.54e9, "7B": 7.61e9}[name]
    assert roofline.parameter_count(config) == _meta_count(config)
    assert abs(roofline.parameter_count(config) - published) / published < 0.01


def test_weight_bytes_per_step():
    tied = roofline.qwen2_config("toy")
    untied = roofline.qwen2_config("toy", tie_word_embeddings=False)
    # Tied: the LM head reads the whole table, so every weight is read once whatever the batch.
    assert roofline.weight_bytes_per_step(tied, 8, 2) == 2 * roofline.parameter_count(tied)
    # Untied: the input table is only gathered, one row per sequence.
    table = untied.vocab_size * untied.hidden_size
    for batch in (1, 64):
        expected = 2 * (roofline.parameter_count(untied) - table + batch * untied.hidden_size)
        assert roofline.weight_bytes_per_step(untied, batch, 2) == expected


def test_kv_bytes():
    config = roofline.qwen2_config("7B")
    per_token = 2 * 28 * 4 * 128 * 2  # K and V, layers, KV heads, head dim, bf16
    assert roofline.kv_bytes_per_token(config, 2) == per_token
    assert per_token == KVGeometry.from_config(config).bytes_per_token(torch.bfloat16)
    assert roofline.kv_bytes_per_step(config, 8, 384.0, 2) == 8 * 384 * per_token


def test_mean_decode_context_and_fraction():
    # Decode steps of prompt 128, 512 new tokens attend over 129 .. 639 entries.
    steps = [128 + s for s in range(1, 512)]
    assert roofline.mean_decode_context(128, 512) == pytest.approx(sum(steps) / len(steps))
    with pytest.raises(ValueError):
        roofline.mean_decode_context(128, 1)
    assert roofline.roofline_fraction(2e9, 2e12, 2e-3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        roofline.roofline_fraction(1.0, 0.0, 1.0)


def test_copy_bandwidth_is_positive():
    assert roofline.copy_bandwidth("cpu", nbytes=1 << 20, repeats=2) > 0


def test_build_random_model():
    config = roofline.qwen2_config("toy")
    model = roofline.build_random_model(config, torch.bfloat16, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == roofline.parameter_count(config)
    rotary = model.model.rotary_emb
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, expected)
    assert torch.isfinite(torch.stack([p.float().abs().max() for p in model.parameters()])).all()
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all((p == 1).all() for p in norms)
    out = model.generate(torch.randint(1, config.vocab_size, (2, 5)), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)


def test_results_table_merges_and_shows_roofline(tmp_path):
    import results_table

    def run(name: str, info: dict) -> dict:
        bench = {
            "name": name,
            "fullname": f"benchmarks/x.py::{name}",
            "stats": {"median": 0.5},
            "extra_info": info,
        }
        return {"machine_info": {"effdecode_environment": {"device": "H100"}}, "benchmarks": [bench]}

    first = run(
        "test_a[effdecode-7B-8]", {"mode": "effdecode", "roofline_fraction": 0.61, "tokens_per_s": 1234.5}
    )
    second = run("test_b", {"impl": "triton", "achieved_GBps": 2500.0})
    paths = []
    for i, document in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(document))
    merged, table = tmp_path / "merged.json", tmp_path / "table.md"
    assert results_table.main([*map(str, paths), "--merge", str(merged), "-o", str(table)]) == 0
    assert len(json.loads(merged.read_text())["benchmarks"]) == 2
    markdown = table.read_text()
    assert "device H100" in markdown and "| roofline_fraction |" in markdown
    assert (
        "| test_a[effdecode-7B-8] | 500 | effdecode |" in markdown
        and "0.61" in markdown
        and "1,234" in markdown
    )
