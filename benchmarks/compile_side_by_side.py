"""HF ``generate``, effdecode eager and effdecode compiled, side by side in one run, interleaved (issue 12).

Two workloads:

- ``tiny``: the random 4-layer hidden-128 Qwen2 of ``benchmarks/test_e2e_compile.py``, ragged prompts up to 64
  tokens, 128 new tokens, greedy, batch 1 and 8;
- ``reasoner``: the shipped reasoner on held-out eval problems (greedy, EOS ends a row, ``--n`` problems in
  batches of ``--batch-size``, ``--max-new-tokens``), every engine on the same static batches;
- ``eval``: what ``effdecode eval --slots <batch-size> [--compile]`` runs, ``effdecode.generate_batch`` over
  all ``--n`` problems with ``--batch-size`` slots (a finished problem's slot is refilled), against
  transformers' ``generate`` in static batches of ``--batch-size`` on the same problems.

Each round runs every engine once on the same inputs (so a busy machine's drift hits them alike); figures
are the median over rounds of tokens/s (new tokens up to and including EOS, over the call's wall time,
compile time excluded: every effdecode engine runs once before the rounds). The load average is recorded
before and after::

    python benchmarks/compile_side_by_side.py --workload tiny reasoner --rounds 5 \\
        --out benchmarks/results/cpu-x86_64-compile-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from device_info import environment  # noqa: E402
from test_continuous_batching import until_eos  # noqa: E402
from test_e2e_compile import NEW_TOKENS, PROMPT_LEN, build_qwen2  # noqa: E402

import effdecode  # noqa: E402
from effdecode import DecodeConfig  # noqa: E402
from effdecode.demo import demo_prompts  # noqa: E402

ENGINES = ("hf", "effdecode", "effdecode_compiled")


def _new_tokens(sequences: torch.Tensor, width: int, eos: int | None) -> int:
    """New tokens per row up to and including the first EOS, summed."""
    new = sequences[:, width:]
    if eos is None:
        return new.numel()
    hit = new == eos
    first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, new.shape[1])
    return int(first.sum())


def _engine_call(model, engine: str, kwargs: dict):
    """A function of (input_ids, mask) -> (sequences, seconds of decoding) for ``engine``."""

    def call(input_ids, mask):
        started = time.perf_counter()
        if engine == "hf":
            out = model.generate(input_ids, attention_mask=mask, **kwargs)
            return out, time.perf_counter() - started
        config = DecodeConfig(compile=engine == "effdecode_compiled")
        out = effdecode.generate(
            model, input_ids, attention_mask=mask, decode_config=config, return_dict_in_generate=True,
            **kwargs,
        )  # fmt: skip
        return out.sequences, time.perf_counter() - started - out.stats.compile_time_s

    return call


def _measure(model, batches: list, kwargs: dict, eos: int | None, rounds: int) -> dict:
    """Interleaved rounds over ``batches`` (list of (ids, mask)); median tokens/s per engine and ratios."""
    calls = {engine: _engine_call(model, engine, kwargs) for engine in ENGINES}
    reference = {}
    for engine, call in calls.items():  # warm-up (compiles), and the engines must agree
        for index, (ids, mask) in enumerate(batches):
            sequences, _ = call(ids, mask)
            if index in reference and not torch.equal(sequences, reference[index]):
                raise AssertionError(f"{engine} disagrees with hf on batch {index}")
            reference.setdefault(index, sequences)
    tokens = sum(_new_tokens(reference[i], ids.shape[1], eos) for i, (ids, _) in enumerate(batches))
    rates = {engine: [] for engine in ENGINES}
    for _ in range(rounds):
        for engine, call in calls.items():
            seconds = sum(call(ids, mask)[1] for ids, mask in batches)
            rates[engine].append(tokens / seconds)
    median = {engine: statistics.median(values) for engine, values in rates.items()}
    return {
        "new_tokens": tokens,
        "rounds": rounds,
        "tokens_per_s_median": median,
        "tokens_per_s_rounds": rates,
        "compiled_over_hf": median["effdecode_compiled"] / median["hf"],
        "compiled_over_eager": median["effdecode_compiled"] / median["effdecode"],
        "eager_over_hf": median["effdecode"] / median["hf"],
    }


def tiny(rounds: int) -> list[dict]:
    model = build_qwen2("cpu")
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    results = []
    for batch_size in (1, 8):
        ids, mask = demo_prompts(batch_size, PROMPT_LEN, model.config.vocab_size)
        result = _measure(model, [(ids, mask)], kwargs, None, rounds)
        results.append(dict(workload="tiny qwen2 4x128", batch_size=batch_size, **result))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "tokens_per_s_rounds"}), flush=True)
    return results


def reasoner(rounds: int, n: int, batch_size: int, max_new_tokens: int) -> list[dict]:
    from effdecode.workloads.models import load_reasoner
    from effdecode.workloads.problems import generate_problems

    model, tokenizer = load_reasoner("target")
    problems = generate_problems(n, seed=0, split="test")
    batches = []
    for start in range(0, n, batch_size):
        prompts = [p.prompt for p in problems[start : start + batch_size]]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batches.append((encoded["input_ids"], encoded["attention_mask"]))
    eos = tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
    )
    result = _measure(model, batches, kwargs, eos, rounds)
    out = dict(workload="shipped reasoner eval", n=n, batch_size=batch_size, max_new_tokens=max_new_tokens)
    out.update(result)
    print(json.dumps({k: v for k, v in out.items() if k != "tokens_per_s_rounds"}), flush=True)
    return [out]


def _reasoner_prompts(n: int):
    from effdecode.workloads.models import load_reasoner
    from effdecode.workloads.problems import generate_problems

    model, tokenizer = load_reasoner("target")
    problems = generate_problems(n, seed=0, split="test")
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    return model, tokenizer, prompts


def eval_workload(rounds: int, n: int, slots: int, max_new_tokens: int) -> list[dict]:
    """``effdecode eval``'s engine (``generate_batch``, ``slots`` slots; eager and compiled) against HF
    ``generate`` in static batches of ``slots``, interleaved rounds; every engine's tokens must agree."""
    from effdecode.batch_api import left_pad

    model, tokenizer, prompts = _reasoner_prompts(n)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def hf() -> tuple[list, float]:
        tokens, seconds = [], 0.0
        for start in range(0, n, slots):
            input_ids, mask = left_pad(prompts[start : start + slots], tokenizer.pad_token_id)
            started = time.perf_counter()
            out = model.generate(
                input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **ids
            )
            seconds += time.perf_counter() - started
            rows = out[:, input_ids.shape[1] :].tolist()
            tokens += [until_eos(row, tokenizer.eos_token_id) for row in rows]
        return tokens, seconds

    def batch(compile: bool):
        def call() -> tuple[list, float]:
            config = DecodeConfig(max_slots=slots, compile=compile)
            started = time.perf_counter()
            outputs = effdecode.generate_batch(
                model, prompts, decode_config=config, max_new_tokens=max_new_tokens, **ids
            )
            compile_s = next(iter(outputs.values())).call_stats.compile_time_s
            return [o.generated_tokens for o in outputs.values()], time.perf_counter() - started - compile_s

        return call

    calls = {"hf": hf, "effdecode": batch(False), "effdecode_compiled": batch(True)}
    reference = None
    for engine, call in calls.items():  # warm-up (compiles), and the engines must agree
        tokens, _ = call()
        if reference is not None and tokens != reference:
            raise AssertionError(f"{engine} disagrees with hf")
        reference = reference or tokens
    total = sum(len(t) for t in reference)
    rates = {engine: [] for engine in calls}
    for _ in range(rounds):
        for engine, call in calls.items():
            rates[engine].append(total / call()[1])
    median = {engine: statistics.median(values) for engine, values in rates.items()}
    out = dict(
        workload="effdecode eval (generate_batch) vs HF generate in static batches",
        n=n, slots=slots, max_new_tokens=max_new_tokens, new_tokens=total, rounds=rounds,
        tokens_per_s_median=median, tokens_per_s_rounds=rates,
        compiled_over_hf=median["effdecode_compiled"] / median["hf"],
        compiled_over_eager=median["effdecode_compiled"] / median["effdecode"],
        eager_over_hf=median["effdecode"] / median["hf"],
    )  # fmt: skip
    print(json.dumps({k: v for k, v in out.items() if k != "tokens_per_s_rounds"}), flush=True)
    return [out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workload", nargs="+", choices=["tiny", "reasoner", "eval"], default=["tiny", "reasoner", "eval"]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    if "tiny" in args.workload:
        results += tiny(args.rounds)
    if "reasoner" in args.workload:
        results += reasoner(args.rounds, args.n, args.batch_size, args.max_new_tokens)
    if "eval" in args.workload:
        results += eval_workload(args.rounds, args.n, args.batch_size, args.max_new_tokens)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    report = {
        "environment": environment(),
        "commit": commit or None,
        "benchmark": "HF generate vs effdecode eager vs compiled, interleaved rounds",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
