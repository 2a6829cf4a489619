"""Several devices in one process (``device_map``) and the TP helpers that need no second process."""

from __future__ import annotations

import warnings

import pytest
import torch

import effdecode
from effdecode.cache import KVGeometry
from effdecode.distributed import layer_devices, local_kv_heads, placement_problem, tp_size
from tiny_models import ragged_prompts, tiny_model


@pytest.fixture
def model():
    return tiny_model("llama", torch.float64)


def test_layer_devices_follow_the_longest_matching_entry(model):
    assert layer_devices(model) is None  # no device_map
    model.hf_device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": 0,
        "model.layers": "meta",
        "": "cpu",
    }
    assert layer_devices(model) == ["cuda:0", "meta"]
    model.hf_device_map = {"": "cpu"}
    assert layer_devices(model) == ["cpu"] * 2
    assert placement_problem(model) is None


def test_layers_on_one_device_run_effdecode(model):
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    input_ids, mask = ragged_prompts(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = effdecode.generate(
            model, input_ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True
        )
    assert out.stats.target_forwards > 0


def test_layers_over_two_devices_fall_back_naming_the_reason(model):
    input_ids, mask = ragged_prompts(3, 6)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    # Stand-in for accelerate's placement over two GPUs: only the map is read, the weights stay on the CPU.
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    reason = placement_problem(model)
    assert "cuda:0, cuda:1" in reason
    with pytest.warns(UserWarning, match="effdecode does not support `device_map`.*cuda:0, cuda:1"):
        out = effdecode.generate(model, input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)


def test_offloaded_layers_fall_back(model):
    model.hf_device_map = {"model": "disk", "lm_head": "cpu"}
    assert "offloads the decoder layers to disk" in placement_problem(model)


def test_without_tensor_parallel_the_cache_holds_every_head(model):
    assert tp_size(model) == 1
    assert KVGeometry.from_model(model) == KVGeometry.from_config(model.config)
    assert local_kv_heads(model, 2, 16) == 2


def test_local_kv_heads_from_the_plan(model):
    # A model that claims a TP degree without DTensor weights: the count comes from the plan's style.
    model._tp_size = 2
    model._tp_plan = {"model.layers.*.self_attn.k_proj": "colwise"}
    assert local_kv_heads(model, 2, 16) == 1
    with pytest.raises(ValueError, match="3 KV heads cannot be split over 2"):
        local_kv_heads(model, 3, 16)
    model._tp_plan = {"model.layers.*.self_attn.k_proj": "packed_colwise"}
    assert local_kv_heads(model, 4, 16) == 2
    model._tp_plan = {"model.layers.*.self_attn.k_proj": "colwise_gather_output"}
    assert local_kv_heads(model, 2, 16) == 2
