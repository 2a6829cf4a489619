"""``effdecode eval`` under ``torchrun``: data-parallel replicas and a tensor-parallel replica (gloo, CPU).

Two processes print exactly the JSON of one process (completions included, sampled here) apart from the
timings; with ``--tp 2`` the one replica spans both processes (greedy) and its KV cache is half as large.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effdecode.cli import main
from effdecode.distributed import Topology, gather_replicas, init_from_env

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["-n", "5", "--batch-size", "2", "--levels", "1", "2", "--max-new-tokens", "160"]
FLAGS += ["--dtype", "float64", "--threads", "1", "--json", "--show", "5"]
TIMINGS = ("tokens_per_s", "wall_time_s")


def _torchrun(*extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "effdecode", "eval", *FLAGS, *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    return json.loads(lines[0])


def _in_process(*extra: str) -> dict:
    import contextlib
    import io

    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert main(["eval", *FLAGS, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single() -> dict:
    return _in_process()


pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


def test_two_replicas_print_the_single_process_json(single):
    # Sampling: each batch draws from its own seed, so the replicas reproduce one process's draws.
    sampled = ["--do-sample", "--temperature", "3"]
    one, two = _in_process(*sampled), _torchrun(*sampled)
    assert one["n"] == 5 and len(one["completions"]) == 5
    assert one["completions"] != single["completions"]  # it sampled
    assert {k: v for k, v in two.items() if k not in TIMINGS} == {
        k: v for k, v in one.items() if k not in TIMINGS
    }


def test_tensor_parallel_replica_matches_one_process(single):
    pytest.importorskip("accelerate", reason="transformers needs accelerate for tp_plan")
    tp = _torchrun("--tp", "2")
    assert single["accuracy"] > 0 and len(single["completions"]) == 5
    assert tp["kv_peak_bytes"] * 2 == single["kv_peak_bytes"]  # each rank caches its own KV heads
    ignore = (*TIMINGS, "kv_peak_bytes")
    assert {k: v for k, v in tp.items() if k not in ignore} == {
        k: v for k, v in single.items() if k not in ignore
    }


def test_topology_groups_and_validation(monkeypatch):
    topology = Topology(rank=5, world_size=8, local_rank=1, tp=2)
    assert (topology.replica, topology.replicas, topology.tp_rank, topology.is_main) == (2, 4, 1, False)
    assert gather_replicas("x", Topology()) == ["x"]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_from_env() == Topology()
    with pytest.raises(ValueError, match="--tp 2 needs a multiple of 2 processes"):
        init_from_env(2)
    with pytest.raises(ValueError, match="tp=0"):
        init_from_env(0)
