"""Continuous batching (issue 14): ``generate_batch`` with S slots vs static batches of S, side by side.

Workload: the shipped reasoner on held-out problems of levels 1-4 (their outputs run from about 100 to over
300 tokens), greedy, ``max_new_tokens=400``, S = 32. Engines:

- ``effdecode-batch``: :func:`effdecode.generate_batch` with ``max_slots=S`` (finished rows' slots refilled)
- ``effdecode-static``: :func:`effdecode.generate` over static batches of S (a batch runs until its longest
  row ends; finished rows leave the forward)
- ``hf-batch``: transformers' own ``generate_batch`` with ``max_requests_per_batch=S``
- ``hf-static``: transformers' ``generate`` over static batches of S
- ``effdecode-batch-draft`` / ``effdecode-static-draft``: the same with the shipped draft model (4 tokens)
- ``effdecode-batch-kv`` / ``effdecode-static-kv``: a KV budget (128 entries per row), the batch engine with
  as many slots as fit in the memory S full-KV slots take (``auto_slots`` on that memory)
- ``effdecode-batch-compiled`` / ``effdecode-static-compiled`` (``--compile``): the same with
  ``DecodeConfig(compile=True)``, compile time (``stats.compile_time_s``) left out of the seconds

Targets: effdecode-batch >= 1.4x effdecode-static and >= 2x hf-batch in tokens/s.

``pytest benchmarks/test_continuous_batching.py --benchmark-enable`` times each engine on a few problems;
``python benchmarks/test_continuous_batching.py -n 256`` runs them all on the same problems in one process
and writes tokens/s, the ratios, accuracy and how many requests match effdecode-static token for token to
``benchmarks/results/<device>-continuous-batching-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from device_info import device_name, environment  # noqa: E402

import effdecode  # noqa: E402
from effdecode.batch_api import left_pad  # noqa: E402
from effdecode.compression.kv_compressor import KVCompressor  # noqa: E402
from effdecode.config import DecodeConfig  # noqa: E402
from effdecode.generation.slots import auto_slots, row_bytes  # noqa: E402
from effdecode.workloads import extract_answer, generate_problems, load_reasoner  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KV = dict(kv_budget=128, compress_every=64, kv_window=32, kv_sinks=4)
DRAFT_TOKENS = 4


@dataclass
class Workload:
    """The models, the prompts (token ids) and the run's settings."""

    model: torch.nn.Module
    tokenizer: object
    draft: torch.nn.Module
    prompts: list[list[int]]
    answers: list[int]
    width: int = 32
    max_new_tokens: int = 400

    @property
    def ids(self) -> dict:
        return dict(pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)


@dataclass
class Run:
    """One engine's result: generated tokens per request, wall time, and the slots it decoded with."""

    tokens: list[list[int]]
    seconds: float
    slots: int
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds


def workload(n: int, width: int = 32, max_new_tokens: int = 400, seed: int = 0) -> Workload:
    model, tokenizer = load_reasoner("target")
    draft, _ = load_reasoner("draft")
    problems = generate_problems(n, levels=(1, 2, 3, 4), seed=seed, split="test")
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    return Workload(model, tokenizer, draft, prompts, [p.answer for p in problems], width, max_new_tokens)


def _chunks(work: Workload):
    for start in range(0, len(work.prompts), work.width):
        yield work.prompts[start : start + work.width]


def until_eos(row: list[int], eos: int) -> list[int]:
    """``row`` up to and including its first ``eos`` (all of it without one)."""
    return row[: row.index(eos) + 1] if eos in row else row


def effdecode_batch(work: Workload, config: DecodeConfig, **kwargs) -> Run:
    started = time.perf_counter()
    outputs = effdecode.generate_batch(
        work.model,
        work.prompts,
        max_new_tokens=work.max_new_tokens,
        decode_config=config,
        **work.ids,
        **kwargs,
    )
    stats = next(iter(outputs.values())).call_stats
    seconds = time.perf_counter() - started - stats.compile_time_s  # compiling is not decoding
    extra = dict(_draft_info(stats), target_forwards=stats.target_forwards)
    return Run([o.generated_tokens for o in outputs.values()], seconds, stats.slots, extra)


def effdecode_static(work: Workload, config: DecodeConfig, **kwargs) -> Run:
    tokens, seconds, proposed, accepted, forwards = [], 0.0, 0, 0, 0
    for chunk in _chunks(work):
        input_ids, mask = left_pad(chunk, work.tokenizer.pad_token_id)
        started = time.perf_counter()
        out = effdecode.generate(
            work.model,
            input_ids,
            attention_mask=mask,
            max_new_tokens=work.max_new_tokens,
            return_dict_in_generate=True,
            decode_config=config,
            **work.ids,
            **kwargs,
        )
        seconds += time.perf_counter() - started - out.stats.compile_time_s
        width = input_ids.shape[1]
        tokens += [out.sequences[r, width : width + n].tolist() for r, n in enumerate(out.stats.new_tokens)]
        proposed += sum(out.stats.proposed_draft_tokens)
        accepted += sum(out.stats.accepted_draft_tokens)
        forwards += out.stats.target_forwards
    extra = {"draft_acceptance_rate": accepted / proposed if proposed else 0, "target_forwards": forwards}
    return Run(tokens, seconds, work.width, extra)


def hf_batch(work: Workload) -> Run:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=work.max_new_tokens, do_sample=False, **work.ids)
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=work.width)
    started = time.perf_counter()
    outputs = work.model.generate_batch(
        inputs=work.prompts, generation_config=config, continuous_batching_config=cb_config
    )
    seconds = time.perf_counter() - started
    ordered = [outputs[f"req_{i}"].generated_tokens for i in range(len(work.prompts))]
    return Run(ordered, seconds, work.width)


def hf_static(work: Workload) -> Run:
    tokens, seconds = [], 0.0
    eos = work.tokenizer.eos_token_id
    for chunk in _chunks(work):
        input_ids, mask = left_pad(chunk, work.tokenizer.pad_token_id)
        started = time.perf_counter()
        out = work.model.generate(
            input_ids, attention_mask=mask, max_new_tokens=work.max_new_tokens, do_sample=False, **work.ids
        )
        seconds += time.perf_counter() - started
        tokens += [until_eos(row, eos) for row in out[:, input_ids.shape[1] :].tolist()]
    return Run(tokens, seconds, work.width)


def _draft_info(stats) -> dict:
    return {"draft_acceptance_rate": stats.draft_acceptance_rate}


def kv_slots(work: Workload) -> int:
    """Slots with the KV budget in the memory ``width`` full-KV slots take (plain decoding: no lookahead)."""
    longest = max(len(p) for p in work.prompts)
    full_capacity = longest + work.max_new_tokens
    full = row_bytes(work.model, DecodeConfig(), full_capacity)
    config = DecodeConfig(**KV)
    capacity = KVCompressor.capacity_for(config, longest, full_capacity)
    return auto_slots(work.model, config, len(work.prompts), capacity, free_bytes=work.width * full)


def engines(work: Workload) -> dict[str, Callable[[], Run]]:
    """Every engine of the comparison, by name, as a no-argument call."""
    slots = work.width
    draft = dict(assistant_model=work.draft, num_assistant_tokens=DRAFT_TOKENS)
    draft["num_assistant_tokens_schedule"] = "constant"
    return {
        "effdecode-batch": lambda: effdecode_batch(work, DecodeConfig(max_slots=slots)),
        "effdecode-static": lambda: effdecode_static(work, DecodeConfig()),
        "hf-batch": lambda: hf_batch(work),
        "hf-static": lambda: hf_static(work),
        "effdecode-batch-draft": lambda: effdecode_batch(work, DecodeConfig(max_slots=slots), **draft),
        "effdecode-static-draft": lambda: effdecode_static(work, DecodeConfig(), **draft),
        "effdecode-batch-kv": lambda: effdecode_batch(work, DecodeConfig(**KV, max_slots=kv_slots(work))),
        "effdecode-static-kv": lambda: effdecode_static(work, DecodeConfig(**KV)),
        "effdecode-batch-compiled": lambda: effdecode_batch(
            work, DecodeConfig(max_slots=slots, compile=True)
        ),
        "effdecode-static-compiled": lambda: effdecode_static(work, DecodeConfig(compile=True)),
    }


COMPILED = ("effdecode-batch-compiled", "effdecode-static-compiled")


def step_costs(work: Workload, widths=(1, 2, 4, 8, 16, 32), steps: int = 100) -> dict:
    """Seconds per decode step of ``effdecode.generate`` at each width (best of 3; prompts of the workload's
    median length, no EOS), and the least-squares fit ``seconds = fixed + per_row * width``.

    On a CPU a step's cost grows with its rows (``per_row``), which bounds what refilling slots can gain: the
    same row-steps are done either way, only the ``fixed`` part is paid fewer times.
    """
    length = sorted(len(p) for p in work.prompts)[len(work.prompts) // 2]
    pool = [p[-length:] for p in work.prompts if len(p) >= length]
    costs = {}
    for width in widths:
        ids = torch.tensor([pool[i % len(pool)] for i in range(width)])
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            effdecode.generate(
                work.model, ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                pad_token_id=work.tokenizer.pad_token_id, eos_token_id=None,
            )  # fmt: skip
            best = min(best, (time.perf_counter() - started) / (steps + 1))
        costs[width] = best
    x = torch.tensor(list(costs), dtype=torch.float64)
    y = torch.tensor(list(costs.values()), dtype=torch.float64)
    per_row = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    fixed = float(y.mean() - per_row * x.mean())
    return {"seconds_per_step": costs, "fixed_s": fixed, "per_row_s": per_row}


def refill_ceiling(costs: dict, batch: Run, static: Run) -> float:
    """Most ``batch`` can gain over ``static`` under the step-cost fit: both do the same row-steps; ``batch``
    pays the fixed part for its forwards (its prefills counted as steps), ``static`` for its own."""
    tokens = sum(len(t) for t in static.tokens)
    fixed, per_row = costs["fixed_s"], costs["per_row_s"]
    cost = lambda run: run.extra["target_forwards"] * fixed + tokens * per_row  # noqa: E731
    return cost(static) / cost(batch)


def accuracy(work: Workload, run: Run) -> float:
    decode = work.tokenizer.decode
    texts = [decode(t, skip_special_tokens=True) for t in run.tokens]
    return sum(
        extract_answer(text) == answer for text, answer in zip(texts, work.answers, strict=True)
    ) / len(texts)


def warm_up(work: Workload) -> None:
    """One short call of every engine, so first-call costs (imports, allocator) are not timed."""
    small = Workload(work.model, work.tokenizer, work.draft, work.prompts[:2], work.answers[:2], 2, 4)
    for name, run in engines(small).items():
        if name not in COMPILED:  # (their compile time is measured and left out of the timed runs)
            run()


# ------------------------------------------------------------------------------------------ pytest-benchmark


@pytest.fixture(scope="module")
def small_workload():
    torch.set_num_threads(1)
    work = workload(16, width=4, max_new_tokens=400)
    warm_up(work)
    return work


@pytest.mark.parametrize(
    "engine", ["effdecode-batch", "effdecode-static", "hf-batch", "hf-static", "effdecode-batch-kv"]
)
def test_continuous_batching_tokens_per_s(benchmark, small_workload, engine):
    run = benchmark.pedantic(engines(small_workload)[engine], rounds=1, iterations=1)
    assert accuracy(small_workload, run) >= 0.5
    benchmark.extra_info.update(tokens_per_s=run.tokens_per_s, slots=run.slots, **run.extra)


# ----------------------------------------------------------------------------------------------- __main__


def _matches(reference: Run, run: Run) -> int:
    return sum(a == b for a, b in zip(reference.tokens, run.tokens, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=256, help="held-out problems (levels 1-4 in turn)")
    parser.add_argument("--width", type=int, default=32, help="slots / static batch size")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=None, help="a subset of the engines")
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds (a busy machine's drift hits all alike)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also the compiled engines (minutes to compile)"
    )
    parser.add_argument(
        "--step-costs",
        action="store_true",
        help="also time a step per width and bound what refilling can gain",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = workload(args.n, args.width, args.max_new_tokens)
    warm_up(work)
    rounds: dict[str, list[Run]] = {}
    for _ in range(args.rounds):
        for name, run in engines(work).items():
            wanted = name in args.engines if args.engines else name not in COMPILED or args.compile
            if wanted:
                rounds.setdefault(name, []).append(run())
                latest = rounds[name][-1]
                print(f"{name:24s} {latest.tokens_per_s:8.1f} tokens/s  {latest.seconds:7.1f} s", flush=True)
    # The median round of each engine (by wall time; every round decodes the same tokens).
    runs = {name: sorted(done, key=lambda r: r.seconds)[len(done) // 2] for name, done in rounds.items()}
    reference = runs.get("effdecode-static")
    report = {
        "environment": environment(),
        "benchmark": (
            f"shipped reasoner, {args.n} held-out problems (levels 1-4), greedy, max_new_tokens="
            f"{args.max_new_tokens}, {args.width} slots / static batches of {args.width}, "
            f"{args.threads} CPU thread(s), {args.rounds} interleaved round(s), median round"
        ),
        "engines": {
            name: dict(
                tokens_per_s=run.tokens_per_s,
                tokens_per_s_rounds=[r.tokens_per_s for r in rounds[name]],
                seconds=run.seconds,
                new_tokens=sum(len(t) for t in run.tokens),
                slots=run.slots,
                accuracy=accuracy(work, run),
                matches_effdecode_static=None if reference is None else _matches(reference, run),
                **run.extra,
            )
            for name, run in runs.items()
        },
        "ratios": _ratios(runs),
    }
    if args.step_costs:
        costs = step_costs(work)
        report["step_costs"] = costs
        if "effdecode-batch" in runs and reference is not None:
            report["refill_ceiling"] = refill_ceiling(costs, runs["effdecode-batch"], reference)
    text = json.dumps(report, indent=2)
    print(text)
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"{device_name()}-continuous-batching-{date}.json"
    out.write_text(text + "\n")
    print(f"wrote {out}")


def _ratios(runs: dict[str, Run]) -> dict[str, float]:
    pairs = {
        "effdecode-batch / effdecode-static": ("effdecode-batch", "effdecode-static"),
        "effdecode-batch / hf-batch": ("effdecode-batch", "hf-batch"),
        "effdecode-batch / hf-static": ("effdecode-batch", "hf-static"),
        "hf-batch / hf-static": ("hf-batch", "hf-static"),
        "effdecode-batch-draft / effdecode-static-draft": ("effdecode-batch-draft", "effdecode-static-draft"),
        "effdecode-batch-draft / hf-batch": ("effdecode-batch-draft", "hf-batch"),
        "effdecode-batch-kv / effdecode-static-kv": ("effdecode-batch-kv", "effdecode-static-kv"),
        "effdecode-batch-kv / effdecode-batch": ("effdecode-batch-kv", "effdecode-batch"),
        "effdecode-batch-compiled / effdecode-static-compiled": COMPILED,
        "effdecode-batch-compiled / hf-batch": ("effdecode-batch-compiled", "hf-batch"),
        "effdecode-batch-compiled / effdecode-batch": ("effdecode-batch-compiled", "effdecode-batch"),
    }
    return {
        label: runs[a].tokens_per_s / runs[b].tokens_per_s
        for label, (a, b) in pairs.items()
        if a in runs and b in runs
    }


if __name__ == "__main__":
    main()
