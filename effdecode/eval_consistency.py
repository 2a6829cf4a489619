"""``effdecode eval --samples k --consistency {none,esc,adaptive,confidence}``: self-consistency on the
arithmetic reasoning workload.

Each held-out problem gets ``k`` sampled rows (``num_return_sequences``, one shared prefill); their answers
(``</think> Answer: N``) are voted (:mod:`effdecode.consistency`). Reported: majority-vote accuracy, the
one-sample accuracy (mean over rows that finished on their own, with ``none``), generated tokens per problem,
the tokens full self-consistency would have spent (``PromptVote.tokens_full``) and the share saved, wall time
and tokens/s. ``--sweep`` runs every policy and writes a table (and a plot when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import effdecode
from effdecode.config import DecodeConfig
from effdecode.workloads.problems import _ANSWER_RE, Problem, generate_problems

POLICIES = ("none", "esc", "adaptive", "confidence")


@dataclass
class ConsistencyResult:
    """Accuracy and cost of one self-consistency run (means are per problem)."""

    policy: str
    samples: int
    temperature: float
    n: int = 0
    accuracy: float = 0.0  # majority vote
    single_accuracy: float = 0.0  # rows read one by one (rows a policy stopped excluded)
    mean_tokens: float = 0.0  # generated per problem, all its rows
    mean_tokens_full: float = 0.0  # what full self-consistency would have generated (estimate)
    tokens_saved: float = 0.0  # 1 - tokens / tokens_full
    rows_stopped: float = 0.0  # per problem
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def consistency_config(policy: str, window: int = 4, threshold: float | None = None) -> DecodeConfig:
    """The :class:`DecodeConfig` of a policy name (``"none"``: answers voted, no early stop)."""
    fields = dict(answer=_ANSWER_RE.pattern, consistency=None if policy == "none" else policy)
    if policy == "esc":
        fields["consistency_window"] = window
    elif policy != "none" and threshold is not None:
        fields["consistency_threshold"] = threshold
    return DecodeConfig(**fields)


def run_consistency(
    model: torch.nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    samples: int,
    policy: str = "none",
    temperature: float = 1.0,
    max_new_tokens: int = 400,
    prompts_per_call: int = 1,
    seed: int = 0,
    window: int = 4,
    threshold: float | None = None,
    windows: bool = False,
) -> ConsistencyResult:
    """Sample ``samples`` rows per problem, vote, and measure (see the module docstring).

    ``windows``: esc / adaptive sample ``window`` rows per round (:func:`effdecode.generate_in_windows`),
    so rows a decision makes unnecessary never start; otherwise all k rows start together in one call.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}; expected one of {POLICIES}")
    windows = windows and policy in ("esc", "adaptive")
    config = consistency_config(policy, window, threshold)
    label = f"{policy} (windows)" if windows else policy
    result = ConsistencyResult(label, samples, temperature, n=len(problems))
    correct = single_right = single_rows = spent = full = stopped = 0
    wall = 0.0
    for index in range(0, len(problems), prompts_per_call):
        batch = problems[index : index + prompts_per_call]
        votes, seconds = _generate_votes(
            model, tokenizer, batch, samples, config, temperature, max_new_tokens, seed * 1_000_003 + index,
            windows,
        )  # fmt: skip
        wall += seconds
        for problem, vote in zip(batch, votes, strict=True):
            correct += _as_int(vote.answer) == problem.answer
            # Rows read one by one; a stopped row has no answer and is left out (unbiased only with "none").
            single_right += sum(_as_int(a) == problem.answer for a in vote.answers)
            single_rows += vote.rows_finished
            spent, full = spent + vote.tokens_spent, full + vote.tokens_full
            stopped += vote.rows_stopped
    n = max(1, len(problems))
    result.accuracy, result.single_accuracy = correct / n, single_right / max(1, single_rows)
    result.mean_tokens, result.mean_tokens_full = spent / n, full / n
    result.tokens_saved = 1.0 - spent / full if full else 0.0
    result.rows_stopped, result.wall_time_s = stopped / n, wall
    result.tokens_per_s = spent / wall if wall > 0 else 0.0
    return result


def _generate_votes(model, tokenizer, batch, samples, config, temperature, max_new_tokens, seed, windows):
    encoded = tokenizer(
        [p.prompt for p in batch], return_tensors="pt", padding=True, add_special_tokens=False
    )
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    started = time.perf_counter()
    if windows:
        run = effdecode.generate_in_windows(
            model, encoded["input_ids"].to(device), encoded["attention_mask"].to(device), samples=samples,
            decode_config=config, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer,
        )  # fmt: skip
        return run.votes, time.perf_counter() - started
    out = effdecode.generate(
        model, encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, tokenizer=tokenizer, decode_config=config,
    )  # fmt: skip
    return out.stats.consistency, time.perf_counter() - started


def _as_int(answer) -> int | None:
    try:
        return int(answer) if answer is not None else None
    except ValueError:
        return None


def format_table(results: Sequence[ConsistencyResult]) -> str:
    """A Markdown table: one row per run."""
    lines = [
        "| policy | k | T | vote acc. | 1-sample acc. | tokens/problem | full SC | saved | tok/s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.samples} | {r.temperature:g} | {r.accuracy:.3f} | {r.single_accuracy:.3f} | "
            f"{r.mean_tokens:.0f} | {r.mean_tokens_full:.0f} | {r.tokens_saved:.1%} | {r.tokens_per_s:.1f} | "
            f"{r.wall_time_s:.1f} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[ConsistencyResult], path: str | Path) -> Path | None:
    """Accuracy against tokens per problem, one point per policy; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(5, 4))
    for r in results:
        axes.scatter(r.mean_tokens, r.accuracy, label=f"{r.policy} (k={r.samples})")
    axes.set_xlabel("generated tokens per problem")
    axes.set_ylabel("majority-vote accuracy")
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--samples``, ``--consistency`` and the policies' knobs (``effdecode eval``)."""
    from effdecode.cli_types import positive_int, unit_interval

    group = parser.add_argument_group("self-consistency (--samples k > 1)")
    group.add_argument("--samples", type=positive_int, default=1, help="sampled rows per problem (k)")
    group.add_argument("--consistency", choices=POLICIES, default="none", help="early-stop policy")
    group.add_argument("--consistency-window", type=positive_int, default=4, help="esc window")
    group.add_argument(
        "--windows", action="store_true",
        help="esc/adaptive: sample --consistency-window rows per round (rows not needed never start)",
    )  # fmt: skip
    group.add_argument(
        "--consistency-threshold", type=unit_interval, default=None,
        help="adaptive: posterior probability; confidence: share of warm-up rows to beat (default: 0.95 "
        "for adaptive, 0.9 for confidence)",
    )  # fmt: skip


def wanted(args: argparse.Namespace) -> bool:
    """Whether ``effdecode eval`` runs self-consistency (``--samples`` > 1 or a policy)."""
    samples, policy = getattr(args, "samples", 1), getattr(args, "consistency", "none")
    if policy != "none" and samples < 2:
        raise ValueError(f"--consistency {policy} needs --samples >= 2")
    return samples > 1


def prompts_per_call(rows: int, samples: int, policy: str, windows: bool, window: int) -> int:
    """Prompts per ``generate`` call so that a call holds about ``rows`` rows (``window`` per prompt and
    round in windows, else ``samples``)."""
    per_prompt = window if windows and policy in ("esc", "adaptive") else samples
    return max(1, rows // per_prompt)


def main(args: argparse.Namespace, model, tokenizer) -> int:
    """Run self-consistency from parsed ``effdecode eval`` flags (``--sweep``: every policy)."""
    problems = generate_problems(args.n, levels=tuple(args.levels), seed=args.seed, split="test")
    policies = POLICIES if args.sweep else (args.consistency,)
    results = [
        run_consistency(
            model, tokenizer, problems, args.samples, policy, args.temperature, args.max_new_tokens,
            prompts_per_call(args.batch_size, args.samples, policy, args.windows, args.consistency_window),
            args.seed, args.consistency_window, args.consistency_threshold, args.windows,
        )
        for policy in policies
    ]  # fmt: skip
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        print(format_table(results))
    if args.sweep:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "consistency.md").write_text(format_table(results) + "\n")
        image = plot(results, out / "consistency.png")
        if image is not None and not args.json:
            print(f"plot: {image}")
    return 0
