"""The merged decode loop against the old plain loop, plain greedy decoding, side by side (issue 13).

``legacy`` is the plain loop as it was before the merge (``benchmarks/legacy_plain_loop.py``), ``merged`` the
one loop for every mode (``effdecode.generation.loop``). Target: merged at most 3% slower per call, batch 1
and 8, on a CPU with a tiny model (the per-step overhead of the loop, not the model, dominates there).

``pytest benchmarks/test_loop_overhead.py --benchmark-enable`` runs both through pytest-benchmark;
``python benchmarks/test_loop_overhead.py --out benchmarks/results/<name>.json`` measures them interleaved
(alternating calls, so a busy machine's drift hits both alike) and writes the ratio with device and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from device_info import environment  # noqa: E402
from legacy_plain_loop import legacy_run_generation  # noqa: E402

from effdecode.config import DecodeConfig  # noqa: E402
from effdecode.demo import build_demo_model, demo_prompts  # noqa: E402
from effdecode.generation.loop import run_generation  # noqa: E402
from effdecode.generation.request import build_request  # noqa: E402

NEW_TOKENS = 64
PROMPT_LEN = 16
LOOPS = {"legacy": legacy_run_generation, "merged": run_generation}


def _model():
    return build_demo_model(num_layers=2, hidden_size=64, dtype=torch.float32)


def _request(model, batch_size: int):
    input_ids, mask = demo_prompts(batch_size, PROMPT_LEN, model.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=1)
    return build_request(model, input_ids, mask, kwargs, DecodeConfig())


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_plain_greedy_loop(benchmark, model, loop, batch_size):
    request = _request(model, batch_size)
    run = LOOPS[loop]
    sequences = benchmark(run, model, request)
    assert sequences.shape == (batch_size, PROMPT_LEN + NEW_TOKENS)
    benchmark.extra_info["tokens_per_call"] = batch_size * NEW_TOKENS


def measure_interleaved(model, batch_size: int, rounds: int) -> dict:
    """Median seconds per call of each loop over ``rounds`` alternating calls, and merged / legacy."""
    request = _request(model, batch_size)
    times = {name: [] for name in LOOPS}
    assert torch.equal(legacy_run_generation(model, request), run_generation(model, request))
    for _ in range(rounds):
        for name, run in LOOPS.items():
            started = time.perf_counter()
            run(model, request)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch_size": batch_size,
        "new_tokens": NEW_TOKENS,
        "rounds": rounds,
        "median_s": medians,
        "merged_over_legacy": medians["merged"] / medians["legacy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _model()
    results = [measure_interleaved(model, batch, args.rounds) for batch in (1, 8)]
    report = {
        "environment": environment(),
        "benchmark": "plain greedy loop, merged vs legacy",
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
