"""Drafting that does not pay must not cost (issue 13, item 4): the shipped reasoner, plain vs prompt lookup
vs the draft model, side by side.

Workload: ``effdecode eval --threads 1`` (held-out problems, batch 16, greedy). Target: prompt lookup
(``--prompt-lookup 4``, about 25% of its drafts accepted here) at most 5% slower than plain, and the draft
model (``--draft``) keeping its gain. ``pytest benchmarks/test_draft_overhead.py --benchmark-enable`` runs
each mode through pytest-benchmark; ``python benchmarks/test_draft_overhead.py --out FILE`` runs them
interleaved (plain, lookup, draft, plain, ...; a busy machine's drift hits all alike) and writes tokens/s
per mode and the ratios with device and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from device_info import environment  # noqa: E402

from effdecode.eval import EvalOptions, run_eval  # noqa: E402
from effdecode.workloads import load_reasoner  # noqa: E402

MODES = {"plain": {}, "prompt-lookup-4": dict(prompt_lookup=4), "draft": dict(draft="draft")}


def _reasoners():
    target, tokenizer = load_reasoner("target")
    draft, _ = load_reasoner("draft")
    return target, tokenizer, draft


def run_mode(reasoners, mode: str, n: int):
    target, tokenizer, draft = reasoners
    options = EvalOptions(n=n, batch_size=16, **MODES[mode])  # static batches of 16, as measured before
    return run_eval(target, tokenizer, options, draft_model=draft if "draft" in MODES[mode] else None)


@pytest.fixture(scope="module")
def reasoners():
    return _reasoners()


@pytest.mark.parametrize("mode", list(MODES))
def test_reasoner_tokens_per_s(benchmark, reasoners, mode):
    result = benchmark.pedantic(run_mode, args=(reasoners, mode, 16), rounds=1, iterations=1)
    assert result.accuracy > 0.5
    benchmark.extra_info.update(
        tokens_per_s=result.tokens_per_s,
        draft_acceptance_rate=result.draft_acceptance_rate,
        tokens_per_target_forward=result.tokens_per_target_forward,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reasoners = _reasoners()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    extra: dict[str, dict] = {}
    for _ in range(args.rounds):
        for mode in MODES:
            result = run_mode(reasoners, mode, args.n)
            rates[mode].append(result.tokens_per_s)
            extra[mode] = dict(
                accuracy=result.accuracy,
                draft_acceptance_rate=result.draft_acceptance_rate,
                tokens_per_target_forward=result.tokens_per_target_forward,
            )
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    report = {
        "environment": environment(),
        "benchmark": f"effdecode eval -n {args.n} --threads 1 (batch 16, greedy), interleaved rounds",
        "tokens_per_s": rates,
        "median_tokens_per_s": medians,
        "modes": extra,
        "prompt_lookup_over_plain": medians["prompt-lookup-4"] / medians["plain"],
        "draft_over_plain": medians["draft"] / medians["plain"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
