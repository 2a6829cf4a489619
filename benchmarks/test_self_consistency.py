"""Self-consistency that stops early (issue 19): the shipped reasoner on held-out problems, sampled at a
temperature where one sample is clearly worse than greedy.

Runs, side by side in one process: greedy (one row), one sample, full SC@k (k rows per problem, one call,
shared prefill), ``esc`` and ``adaptive`` sampling in windows (:func:`effdecode.generate_in_windows`: rows a
decision makes unnecessary never start), and ``esc`` / ``adaptive`` / ``confidence`` inside one call (all k
rows start together; a decision stops the rows in flight). Reported per run: majority-vote accuracy,
generated tokens per problem, tokens saved against full SC (full SC's own count), tokens/s and wall time.
Targets: SC@16 above one sample; esc / adaptive within 1 point of SC@16 with >= 40% fewer generated tokens.

``pytest benchmarks/test_self_consistency.py --benchmark-enable`` times a small case through pytest-benchmark;
``python benchmarks/test_self_consistency.py -n 100 --out benchmarks/results/FILE.json`` runs the comparison
(the problem count is an option: the machine this was written on is 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from device_info import environment  # noqa: E402

from effdecode.eval import EvalOptions, run_eval  # noqa: E402
from effdecode.eval_consistency import run_consistency  # noqa: E402
from effdecode.workloads import load_reasoner  # noqa: E402
from effdecode.workloads.problems import generate_problems  # noqa: E402

# (label, policy, windows); "none" is full self-consistency.
RUNS = (
    ("SC@k", "none", False),
    ("esc, windows", "esc", True),
    ("adaptive, windows", "adaptive", True),
    ("esc, one call", "esc", False),
    ("adaptive, one call", "adaptive", False),
    ("confidence, one call", "confidence", False),
)


def run_all(
    model,
    tokenizer,
    n: int,
    samples: int,
    temperature: float,
    window: int,
    rows: int,
    threshold: float | None = None,
    windows_only: bool = False,
) -> dict:
    problems = generate_problems(n, seed=0, split="test")
    report: dict = {}
    started = time.perf_counter()
    greedy = run_eval(model, tokenizer, EvalOptions(n=n, batch_size=min(rows, 64)))
    report["greedy"] = dict(accuracy=greedy.accuracy, tokens_per_problem=greedy.mean_new_tokens,
                            wall_time_s=time.perf_counter() - started)  # fmt: skip
    single = run_consistency(model, tokenizer, problems, 1, "none", temperature, prompts_per_call=rows)
    report["one sample"] = single.to_dict()
    runs = [run for run in RUNS if run[0] == "SC@k" or run[2] or not windows_only]
    for label, policy, windows in runs:
        per_call = max(1, rows // (window if windows else samples))
        result = run_consistency(
            model, tokenizer, problems, samples, policy, temperature, prompts_per_call=per_call,
            window=window, windows=windows, threshold=threshold if policy == "adaptive" else None,
        )  # fmt: skip
        report[label] = result.to_dict()
    full = report["SC@k"]
    for label, _, _ in runs:
        entry = report[label]
        entry["tokens_saved_vs_full_sc"] = 1.0 - entry["mean_tokens"] / full["mean_tokens"]
        entry["accuracy_minus_full_sc"] = entry["accuracy"] - full["accuracy"]
        entry["wall_time_over_full_sc"] = entry["wall_time_s"] / full["wall_time_s"]
    return report


@pytest.fixture(scope="module")
def reasoner():
    return load_reasoner("target")


@pytest.mark.parametrize("policy, windows", [("none", False), ("esc", True), ("adaptive", True)])
def test_self_consistency_cost(benchmark, reasoner, policy, windows):
    model, tokenizer = reasoner
    problems = generate_problems(4, seed=0, split="test")
    result = benchmark.pedantic(
        run_consistency, args=(model, tokenizer, problems, 8, policy, 1.0),
        kwargs=dict(prompts_per_call=4, windows=windows), rounds=1, iterations=1,
    )  # fmt: skip
    assert result.accuracy > 0.5
    benchmark.extra_info.update(result.to_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=100, help="held-out problems")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=None, help="adaptive: posterior (default 0.95)")
    parser.add_argument("--windows-only", action="store_true", help="of the policies, only the windowed ones")
    parser.add_argument("--rows", type=int, default=128, help="rows per generate call (about)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_reasoner("target")
    report = {
        "environment": environment(),
        "benchmark": (
            f"python benchmarks/test_self_consistency.py -n {args.n} --samples {args.samples} --temperature "
            f"{args.temperature} --window {args.window} --rows {args.rows} --threads {args.threads}"
            + (f" --threshold {args.threshold}" if args.threshold is not None else "")
            + (" --windows-only" if args.windows_only else "")
        ),
        "runs": run_all(
            model,
            tokenizer,
            args.n,
            args.samples,
            args.temperature,
            args.window,
            args.rows,
            args.threshold,
            args.windows_only,
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
