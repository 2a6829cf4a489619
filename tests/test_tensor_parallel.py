"""Tensor parallel on the CPU: ``torchrun --nproc-per-node 2`` (gloo) runs tests/tp_worker.py once.

Each rank loads tiny float64 models with ``tp_plan="auto"`` and writes what it saw; the assertions are here.
They prove, on every rank: greedy output identical to transformers' own tensor-parallel ``generate`` (Llama
and Qwen3, ragged prompts, rows finishing at different steps), also with n-gram and draft-model speculation
(the draft replicated on each rank); the slot cache holding the rank's KV heads only (``kv_peak_bytes`` half
of the single-process figure); eviction under every policy giving exactly the single-process result (the
keep sets of the two ranks' heads together are the single-process keep sets); sampled tokens identical on
both ranks; and ranks seeded differently refused before they could desynchronize.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model

HERE = Path(__file__).resolve().parent
POLICIES = ("streaming", "h2o", "snapkv", "rkv")

pytest.importorskip("accelerate", reason="transformers needs accelerate for tp_plan")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("tp")
    models, out = root / "models", root / "out"
    out.mkdir()
    tiny_model("llama", torch.float64).save_pretrained(models / "llama")
    tiny_model("qwen3", torch.float64, seed=2).save_pretrained(models / "qwen3")
    tiny_model("llama", torch.float64, seed=1, num_hidden_layers=1).save_pretrained(models / "draft")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--standalone", str(HERE / "tp_worker.py"), str(models), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in records:
        assert record["errors"] == {}, "\n".join(record["errors"].values())
    return records


def test_cache_holds_the_local_kv_heads(ranks):
    for record in ranks:
        assert record["geometry"] == {"tp_size": 2, "local": 1, "global": 2, "replicated": 2}
        assert record["qwen3"]["local"] == 1
        greedy = record["greedy"]
        assert greedy["kv_peak_bytes"] * 2 == greedy["kv_peak_bytes_single"]
        for policy in POLICIES:  # the eviction side buffers are per local head too
            evict = record[f"evict_{policy}"]
            assert evict["kv_peak_bytes"] * 2 == evict["kv_peak_bytes_single"]


@pytest.mark.parametrize("check", ["greedy", "ngram", "draft_model", "qwen3"])
def test_greedy_matches_hf_tensor_parallel_generate(ranks, check):
    for record in ranks:
        assert record[check]["effdecode"] == record[check]["hf"]
    new_tokens = ranks[0]["greedy"]["new_tokens"]
    assert len(set(new_tokens)) > 1  # rows finished at different steps
    if check in ("ngram", "draft_model"):
        assert sum(ranks[0][check]["proposed"]) > 0  # speculation really drafted


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_keeps_what_one_process_keeps(ranks, policy):
    for record in ranks:
        evict = record[f"evict_{policy}"]
        assert evict["tp"] == evict["single"]
        assert evict["evicted_tp"] == evict["evicted_single"]
        assert sum(evict["evicted_tp"]) > 0
    # Eviction changed the text, so the agreement is not the trivial one of an unused budget.
    assert any(ranks[0][f"evict_{p}"]["tp"] != ranks[0]["greedy"]["hf"] for p in POLICIES)


def test_eviction_with_speculation(ranks):
    for record in ranks:
        assert record["evict_ngram"]["tp"] == record["evict_ngram"]["single"]
        assert sum(record["evict_ngram"]["evicted_tp"]) > 0


def test_sampling_identical_on_every_rank(ranks):
    assert ranks[0]["sampling"] == ranks[1]["sampling"]
    plain = ranks[0]["sampling"]["plain"]
    assert plain != ranks[0]["greedy"]["hf"]  # it did sample


def test_differently_seeded_ranks_are_refused(ranks):
    for record in ranks:
        assert record["rng_mismatch"] is not None
        assert "RNG state" in record["rng_mismatch"]


def test_host_decisions_agree_across_ranks(ranks):
    # One rank's True (its clock ran out) stops every rank; the replicated model needs no agreement.
    assert ranks[0]["agree_any"] == [True, False, True, [True, False, True]]
    assert ranks[1]["agree_any"] == [True, False, False, [True, False, True]]
