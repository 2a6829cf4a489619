"""``effdecode eval``: accuracy and cost of decoding options on the arithmetic reasoning workload.

Held-out problems (:func:`effdecode.workloads.generate_problems`, ``split="test"``) go through
:func:`effdecode.generate_batch` (continuous batching: ``slots`` rows decode at once, waiting problems take
the slots of finished ones) with the given :class:`effdecode.DecodeConfig` and generate options; a row is
correct when the integer after its ``</think>`` and ``Answer:`` is the problem's value.

``run_eval`` is the library entry point; ``run_sweep`` runs a grid (KV budgets per policy, thinking budgets,
early-exit thresholds), writes a Markdown table, a JSON file and a PNG plot, and records an error in the
row of any configuration that raises.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import effdecode
from effdecode import eval_consistency
from effdecode.config import KV_POLICIES, DecodeConfig
from effdecode.distributed import Topology, gather_replicas, init_from_env
from effdecode.workloads.problems import LEVELS, THINK_END, Problem, extract_answer, generate_problems

# Strings of the workload's trace format used by the early-exit probe and the thinking budget.
EARLY_EXIT_PROBE = "\n</think>\nAnswer: "
# Replacing the trigger (which starts a line), the probe starts where the trigger did.
EARLY_EXIT_PROBE_REPLACING = "</think>\nAnswer: "
EARLY_EXIT_TRIGGERS = ("Wait",)
THINK_END_PREFIX = "\n"

# What a JSON result always holds.
METRICS = (
    "accuracy",
    "mean_new_tokens",
    "mean_thinking_tokens",
    "tokens_per_s",
    "kv_peak_tokens",
    "draft_acceptance_rate",
    "tokens_per_target_forward",
)


@dataclass
class EvalOptions:
    """What one evaluation runs: which problems, which model options, which decoding options.

    Parameters mirror the ``effdecode eval`` flags; ``draft`` is a draft model name or directory (None: no
    draft model), ``prompt_lookup`` the n-gram draft length (None: off). ``kv_budget``, ``thinking_budget``,
    ``early_exit`` and ``slots`` (``max_slots``: rows decoded at once, an int or ``"auto"``) go to
    :class:`effdecode.DecodeConfig`. ``batch_size`` is the problems per ``generate_batch`` call (None: all of
    a replica's problems in one call); ``progress_bar`` shows a tqdm bar per call.
    """

    n: int = 64
    levels: tuple[int, ...] = LEVELS
    seed: int = 0
    batch_size: int | None = None
    slots: int | str = "auto"
    progress_bar: bool = False
    max_new_tokens: int = 400
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kv_budget: int | None = None
    kv_policy: str = "streaming"
    kv_window: int = 32
    kv_sinks: int = 4
    compress_every: int = 64
    kv_think_only: bool = False
    thinking_budget: int | None = None
    think_end_prefix: str = THINK_END_PREFIX
    early_exit: bool = False
    early_exit_threshold: float = 0.95
    early_exit_triggers: tuple[str, ...] = EARLY_EXIT_TRIGGERS
    early_exit_answer_tokens: int = 4
    early_exit_replace: bool = False
    draft: str | None = None
    num_draft_tokens: int = 4
    prompt_lookup: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={self.n!r}; expected an int >= 1")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size={self.batch_size!r}; expected None or an int >= 1")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}; expected an int >= 1")
        self.levels = tuple(self.levels)
        for level in self.levels:
            if level not in LEVELS:
                raise ValueError(f"difficulty level {level!r} is out of range; expected one of {LEVELS}")
        if self.draft is not None and self.prompt_lookup is not None:
            raise ValueError("choose either a draft model (draft) or prompt lookup (prompt_lookup), not both")
        if self.prompt_lookup is not None and self.prompt_lookup < 1:
            raise ValueError(f"prompt_lookup={self.prompt_lookup!r}; expected an int >= 1")
        self.early_exit_triggers = tuple(self.early_exit_triggers)

    def decode_config(self) -> DecodeConfig:
        """The :class:`effdecode.DecodeConfig` of these options (validated there)."""
        return DecodeConfig(
            kv_budget=self.kv_budget,
            kv_policy=self.kv_policy,
            kv_window=self.kv_window,
            kv_sinks=self.kv_sinks,
            compress_every=self.compress_every,
            kv_think_only=self.kv_think_only,
            thinking_budget=self.thinking_budget,
            think_end_prefix=self.think_end_prefix if self.thinking_budget is not None else None,
            early_exit="deer" if self.early_exit else None,
            early_exit_triggers=list(self.early_exit_triggers),
            early_exit_probe=EARLY_EXIT_PROBE_REPLACING if self.early_exit_replace else EARLY_EXIT_PROBE,
            early_exit_replace_trigger=self.early_exit_replace,
            early_exit_answer_tokens=self.early_exit_answer_tokens,
            early_exit_threshold=self.early_exit_threshold,
            compile=self.compile,
            max_slots=self.slots,
        )

    def label(self) -> str:
        """A short description of the non-default decoding options."""
        parts = []
        if self.kv_budget is not None:
            parts.append(f"kv {self.kv_policy} {self.kv_budget}")
        if self.thinking_budget is not None:
            parts.append(f"think<={self.thinking_budget}")
        if self.early_exit:
            mode = " (replace trigger)" if self.early_exit_replace else ""
            parts.append(f"early exit {self.early_exit_threshold:g}{mode}")
        if self.draft is not None:
            parts.append(f"draft {self.draft} k={self.num_draft_tokens}")
        if self.prompt_lookup is not None:
            parts.append(f"prompt lookup k={self.prompt_lookup}")
        if self.do_sample:
            parts.append(f"sample T={self.temperature:g}")
        return ", ".join(parts) or "full KV, greedy"


@dataclass
class EvalResult:
    """Accuracy and cost of one evaluation (all problems together unless named per level)."""

    options: EvalOptions
    n: int = 0
    correct: int = 0
    accuracy: float = 0.0
    accuracy_per_level: dict[int, float] = field(default_factory=dict)
    mean_new_tokens: float = 0.0
    mean_thinking_tokens: float = 0.0
    tokens_per_s: float = 0.0
    kv_peak_tokens: int = 0
    kv_peak_bytes: int = 0
    draft_acceptance_rate: float = 0.0
    tokens_per_target_forward: float = 0.0
    target_forwards: int = 0
    wall_time_s: float = 0.0
    slots: int = 0
    error: str | None = None
    completions: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, completions: bool = False) -> dict:
        """A JSON-ready dict: the metrics, ``n``, ``correct``, timings and the options."""
        out = {name: getattr(self, name) for name in METRICS}
        out.update(
            n=self.n,
            correct=self.correct,
            accuracy_per_level={str(level): acc for level, acc in self.accuracy_per_level.items()},
            kv_peak_bytes=self.kv_peak_bytes,
            target_forwards=self.target_forwards,
            wall_time_s=self.wall_time_s,
            slots=self.slots,
            error=self.error,
            config=self.options.label(),
            options=asdict(self.options),
        )
        if completions:
            out["completions"] = self.completions
        return out


def _resolve_model(name_or_path: str, device: str, dtype: torch.dtype, tp: int = 1):
    """A shipped reasoner by name, or any HF checkpoint directory, with its tokenizer.

    With ``tp > 1`` (under ``torchrun``) the model is loaded with its tensor-parallel plan (as
    ``tp_plan="auto"``): transformers shards it over the ranks and places it on each rank's device.
    """
    from effdecode.workloads.models import REASONER_NAMES, load_reasoner, load_tokenizer, model_dir

    if tp <= 1 and name_or_path in REASONER_NAMES:
        return load_reasoner(name_or_path, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name_or_path) if name_or_path in REASONER_NAMES else Path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"model {name_or_path!r} is neither one of {REASONER_NAMES} nor a directory")
    if tp > 1:
        # DistributedConfig(tp_size=N) is tp_plan="auto" without its deprecation (transformers 5.17+).
        from transformers import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, distributed_config=DistributedConfig(tp_size=tp)
        ).eval()
    else:
        model = (
            AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            .to(device)
            .eval()
        )
    if name_or_path in REASONER_NAMES:
        return model, load_tokenizer(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"
    return model, tokenizer


def thinking_token_count(new_ids: Sequence[int], think_end_id: int) -> int:
    """Tokens a row generated before its ``</think>`` (all of them when thinking never closed)."""
    new_ids = list(new_ids)
    return new_ids.index(think_end_id) if think_end_id in new_ids else len(new_ids)


def _generate_kwargs(options: EvalOptions, tokenizer, draft_model) -> dict:
    kwargs = dict(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tokenizer=tokenizer,
        progress_bar=options.progress_bar,
    )
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    kwargs["decode_config"] = options.decode_config()
    if draft_model is not None:
        kwargs.update(
            assistant_model=draft_model,
            num_assistant_tokens=options.num_draft_tokens,
            num_assistant_tokens_schedule="constant",
        )
    if options.prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = options.prompt_lookup
    return kwargs


def _batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch ``index``: per batch, so a batch draws the same wherever it runs."""
    return seed * 1_000_003 + index


def _run_batches(model, tokenizer, batches, options: EvalOptions, kwargs: dict) -> list[dict]:
    """One ``generate_batch`` call per ``(index, problems)`` batch; one record per call (per-row results and
    the call's stats)."""
    think_end_id = tokenizer.convert_tokens_to_ids(THINK_END)
    records = []
    for index, batch in batches:
        prompts = tokenizer([p.prompt for p in batch], add_special_tokens=False)["input_ids"]
        if options.do_sample:
            torch.manual_seed(_batch_seed(options.seed, index))
        outputs = list(effdecode.generate_batch(model, prompts, **kwargs).values())
        rows = []
        for output, problem in zip(outputs, batch, strict=True):
            ids = output.generated_tokens
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ok = extract_answer(text) == problem.answer
            rows.append((text, ok, problem.level, len(ids), thinking_token_count(ids, think_end_id)))
        records.append(dict(index=index, rows=rows, **_call_record(outputs[0].call_stats)))
    return records


def _call_record(stats) -> dict:
    """What a batch record keeps of one call's :class:`effdecode.GenerationStats`."""
    return dict(
        wall_time_s=stats.wall_time_s - stats.compile_time_s,  # compiling steps is not decoding
        target_forwards=stats.target_forwards,
        kv_peak_tokens=stats.kv_peak_tokens,
        kv_peak_bytes=stats.kv_peak_bytes,
        row_forwards=sum(stats.target_row_forwards),
        proposed=sum(stats.proposed_draft_tokens),
        accepted=sum(stats.accepted_draft_tokens),
        slots=getattr(stats, "slots", 0),
    )


def run_eval(
    model: torch.nn.Module,
    tokenizer,
    options: EvalOptions | None = None,
    draft_model: torch.nn.Module | None = None,
    problems: Sequence[Problem] | None = None,
    topology: Topology | None = None,
) -> EvalResult:
    """Run held-out problems through :func:`effdecode.generate_batch` and measure accuracy and cost.

    Parameters
    ----------
    model, tokenizer
        The target and its tokenizer (left padding).
    options : EvalOptions, optional
        Problems and decoding options; defaults to :class:`EvalOptions` ().
    draft_model : torch.nn.Module, optional
        The draft for speculative decoding (needed when ``options.draft`` is set).
    problems : sequence of Problem, optional
        Problems to run instead of ``options.n`` held-out ones.
    topology : effdecode.distributed.Topology, optional
        Under ``torchrun``: the batches are dealt round-robin to the replicas (each replica's ranks run the
        same batches) and every rank gets the gathered result. Batches keep their composition and their
        sampling seed, so every completion, and the accuracy, is what one process computes.

    Returns
    -------
    EvalResult
        Accuracy (overall and per level), mean new / thinking tokens per problem, tokens/s over the
        ``generate`` wall time, the peak KV entries of a row, the draft acceptance rate (accepted / proposed
        draft tokens) and the mean tokens a row gained per target forward. With several replicas,
        ``wall_time_s`` is the slowest replica's ``generate`` time and tokens/s the aggregate throughput.
    """
    options = options or EvalOptions()
    if options.draft is not None and draft_model is None:
        raise ValueError(f"options.draft={options.draft!r} but no draft_model was given")
    if problems is None:
        problems = generate_problems(options.n, levels=options.levels, seed=options.seed, split="test")
    kwargs = _generate_kwargs(options, tokenizer, draft_model if options.draft is not None else None)
    batches = _batches(problems, options.batch_size, topology)

    if topology is None or not topology.distributed:
        records = _run_batches(model, tokenizer, batches, options, kwargs)
        per_replica = [records]
    else:
        mine = batches[topology.replica :: topology.replicas]
        try:
            outcome = (_run_batches(model, tokenizer, mine, options, kwargs), None)
        except Exception as error:  # noqa: BLE001 - every rank must reach the gather, then all raise
            outcome, own_error = (None, f"{type(error).__name__}: {error}"), error
        else:
            own_error = None
        gathered = gather_replicas(outcome, topology)
        if own_error is not None:
            raise own_error
        failed = [(replica, err) for replica, (_, err) in enumerate(gathered) if err is not None]
        if failed:
            replica, err = failed[0]
            raise RuntimeError(f"replica {replica} failed: {err}")
        per_replica = [records for records, _ in gathered]
    return _summarize(options, len(problems), per_replica)


def _batches(problems: Sequence[Problem], size: int | None, topology: Topology | None):
    """``(index, problems)`` per ``generate_batch`` call: ``size`` problems each, or (None) one call per
    replica."""
    if size is None:
        replicas = topology.replicas if topology is not None and topology.distributed else 1
        size = max(1, math.ceil(len(problems) / replicas))
    return [(i, problems[start : start + size]) for i, start in enumerate(range(0, len(problems), size))]


def _summarize(options: EvalOptions, n: int, per_replica: list[list[dict]]) -> EvalResult:
    """One :class:`EvalResult` from every replica's batch records (merged in batch order)."""
    records = sorted((record for records in per_replica for record in records), key=lambda r: r["index"])
    result = EvalResult(options=options, n=n)
    new_tokens: list[int] = []
    thinking: list[int] = []
    per_level: dict[int, list[bool]] = {}
    for record in records:
        for text, ok, level, new, think in record["rows"]:
            result.completions.append(text)
            result.correct += ok
            per_level.setdefault(level, []).append(ok)
            new_tokens.append(new)
            thinking.append(think)
        result.target_forwards += record["target_forwards"]
        result.kv_peak_tokens = max(result.kv_peak_tokens, record["kv_peak_tokens"])
        result.kv_peak_bytes = max(result.kv_peak_bytes, record["kv_peak_bytes"])
        result.slots = max(result.slots, record["slots"])
    row_forwards = sum(record["row_forwards"] for record in records)
    proposed = sum(record["proposed"] for record in records)
    accepted = sum(record["accepted"] for record in records)
    # Replicas run side by side: the evaluation takes as long as the slowest one.
    result.wall_time_s = max(sum(record["wall_time_s"] for record in records) for records in per_replica)
    result.accuracy = result.correct / result.n
    result.accuracy_per_level = {lv: sum(oks) / len(oks) for lv, oks in sorted(per_level.items())}
    result.mean_new_tokens = sum(new_tokens) / result.n
    result.mean_thinking_tokens = sum(thinking) / result.n
    result.tokens_per_s = sum(new_tokens) / result.wall_time_s if result.wall_time_s > 0 else 0.0
    result.tokens_per_target_forward = sum(new_tokens) / row_forwards if row_forwards else 0.0
    result.draft_acceptance_rate = accepted / proposed if proposed else 0.0
    return result


def format_result(result: EvalResult) -> str:
    """The human-readable report of one evaluation."""
    options = result.options
    per_level = "  ".join(f"L{lv} {acc:.1%}" for lv, acc in result.accuracy_per_level.items())
    lines = [
        f"config: {options.label()}  "
        f"(n={result.n}, levels {list(options.levels)}, {_batching(options)}, {result.slots} slots)",
        f"accuracy:                  {result.accuracy:.1%} ({result.correct}/{result.n})  [{per_level}]",
        f"mean new tokens:           {result.mean_new_tokens:.1f}",
        f"mean thinking tokens:      {result.mean_thinking_tokens:.1f}",
        f"tokens/s:                  {result.tokens_per_s:.0f}",
        f"peak KV (tokens per row):  {result.kv_peak_tokens}",
        f"draft acceptance rate:     {result.draft_acceptance_rate:.1%}",
        f"tokens per target forward: {result.tokens_per_target_forward:.2f}",
    ]
    return "\n".join(lines)


def _batching(options: EvalOptions) -> str:
    calls = "one generate_batch call" if options.batch_size is None else f"calls of {options.batch_size}"
    return f"{calls}, max_slots {options.slots}"


# ----------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepGrid:
    """The configurations a sweep runs besides the full-KV greedy baseline."""

    kv_budgets: tuple[int, ...] = (48, 64, 96, 128, 192)
    kv_policies: tuple[str, ...] = KV_POLICIES
    thinking_budgets: tuple[int, ...] = (16, 32, 64, 96, 128, 192)
    early_exit_thresholds: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)

    def configurations(self, base: EvalOptions) -> list[tuple[str, EvalOptions]]:
        """``(family, options)`` pairs: "baseline", "kv", "thinking_budget", "early_exit",
        "early_exit_replace" (the probe replaces its trigger)."""
        plain = replace(base, kv_budget=None, thinking_budget=None, early_exit=False)
        grid = [("baseline", plain)]
        for policy in self.kv_policies:
            for budget in self.kv_budgets:
                grid.append(("kv", replace(plain, kv_budget=budget, kv_policy=policy)))
        for budget in self.thinking_budgets:
            grid.append(("thinking_budget", replace(plain, thinking_budget=budget)))
        for threshold in self.early_exit_thresholds:
            grid.append(("early_exit", replace(plain, early_exit=True, early_exit_threshold=threshold)))
        for threshold in self.early_exit_thresholds:
            replacing = replace(
                plain, early_exit=True, early_exit_threshold=threshold, early_exit_replace=True
            )
            grid.append(("early_exit_replace", replacing))
        return grid


def run_sweep(
    model: torch.nn.Module,
    tokenizer,
    base: EvalOptions,
    grid: SweepGrid | None = None,
    out_dir: str | Path = ".",
    draft_model: torch.nn.Module | None = None,
    log=print,
    topology: Topology | None = None,
) -> list[dict]:
    """Run every configuration of ``grid`` on the same problems; write a table, JSON and a plot.

    The files are ``sweep.md``, ``sweep.json`` and ``sweep.png`` in ``out_dir``.

    A configuration that raises gets a row with its ``error`` and no metrics; the sweep goes on. Under
    ``torchrun`` (``topology``) every configuration is sharded over the replicas as in :func:`run_eval`;
    only rank 0 logs and writes the files.
    """
    main_rank = topology is None or topology.is_main
    if not main_rank:
        log = lambda *_, **__: None  # noqa: E731
    grid = grid or SweepGrid()
    out_dir = Path(out_dir)
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    problems = generate_problems(base.n, levels=base.levels, seed=base.seed, split="test")
    rows = []
    for family, options in grid.configurations(base):
        started = time.perf_counter()
        try:
            row = run_eval(
                model, tokenizer, options, draft_model=draft_model, problems=problems, topology=topology
            ).to_dict()
        except Exception as error:  # noqa: BLE001 - a sweep records what failed and goes on
            row = {name: None for name in METRICS}
            row.update(
                config=options.label(), options=asdict(options), error=f"{type(error).__name__}: {error}"
            )
        row["family"] = family
        rows.append(row)
        status = row["error"] or f"accuracy {row['accuracy']:.1%}, {row['mean_new_tokens']:.1f} new tokens"
        log(f"[{time.perf_counter() - started:5.1f}s] {family:15s} {row['config']}: {status}")
    if not main_rank:
        return rows
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "sweep.md").write_text(sweep_table(rows))
    plot_sweep(rows, out_dir / "sweep.png")
    log(f"wrote {out_dir / 'sweep.md'}, {out_dir / 'sweep.json'}, {out_dir / 'sweep.png'}")
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def sweep_table(rows: Sequence[dict]) -> str:
    """A Markdown table of sweep rows."""
    header = (
        "| family | config | accuracy | mean new tokens | mean thinking tokens | tokens/s | peak KV | "
        "draft acceptance | tokens/target fwd | error |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['config']} | {_fmt(row['accuracy'], '.1%')} | "
            f"{_fmt(row['mean_new_tokens'], '.1f')} | {_fmt(row['mean_thinking_tokens'], '.1f')} | "
            f"{_fmt(row['tokens_per_s'], '.0f')} | {_fmt(row['kv_peak_tokens'], 'd')} | "
            f"{_fmt(row['draft_acceptance_rate'], '.1%')} | "
            f"{_fmt(row['tokens_per_target_forward'], '.2f')} | "
            f"{(row.get('error') or '').replace('|', '/')[:120]} |"
        )
    return header + "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict], path: str | Path) -> Path:
    """Accuracy vs KV budget per policy (left) and accuracy vs mean new tokens for thinking budgets and
    early-exit thresholds (right); failed configurations are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row.get("error") is None and row.get("accuracy") is not None]
    baseline = next((row for row in done if row["family"] == "baseline"), None)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = sorted({row["options"]["kv_policy"] for row in done if row["family"] == "kv"})
    for policy in policies:
        points = sorted(
            (row["options"]["kv_budget"], row["accuracy"])
            for row in done
            if row["family"] == "kv" and row["options"]["kv_policy"] == policy
        )
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
    if baseline is not None:
        left.axhline(baseline["accuracy"], color="gray", linestyle="--", label="full KV")
        right.scatter(
            [baseline["mean_new_tokens"]], [baseline["accuracy"]], color="black", label="full thinking"
        )
    left.set_xlabel("KV budget (entries per row and layer)")
    left.set_ylabel("accuracy")
    left.set_title("Accuracy vs KV budget")
    labels = {
        "thinking_budget": "thinking budget",
        "early_exit": "early exit, probe after trigger (threshold)",
        "early_exit_replace": "early exit, probe replaces trigger (threshold)",
    }
    for family, marker, key in (
        ("thinking_budget", "s", "thinking_budget"),
        ("early_exit", "^", None),
        ("early_exit_replace", "v", None),
    ):
        points = sorted(
            (row["mean_new_tokens"], row["accuracy"], row["options"][key or "early_exit_threshold"])
            for row in done
            if row["family"] == family
        )
        if not points:
            continue
        right.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=labels[family])
        for x, y, value in points:
            right.annotate(f"{value:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    right.set_xlabel("mean new tokens per problem")
    right.set_ylabel("accuracy")
    right.set_title("Accuracy vs tokens")
    for axis in (left, right):
        axis.set_ylim(-0.02, 1.02)
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if len(done) < len(rows):
        figure.text(0.01, 0.01, f"{len(rows) - len(done)} configuration(s) failed; see the table", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``effdecode eval`` flags: each with help (the parser shows defaults) and a validating type."""
    _add_problem_arguments(parser.add_argument_group("problems"))
    _add_model_arguments(parser.add_argument_group("model"))
    _add_generate_arguments(parser.add_argument_group("generate"))
    _add_decode_config_arguments(parser.add_argument_group("DecodeConfig"))
    _add_output_arguments(parser.add_argument_group("output"))
    _add_sweep_arguments(parser.add_argument_group("sweep"))
    eval_consistency.add_arguments(parser)  # --samples / --consistency (effdecode.eval_consistency)


def _add_problem_arguments(group) -> None:
    from effdecode.cli_types import int_in, non_negative_int, positive_int

    level = int_in(min(LEVELS), max(LEVELS))
    group.add_argument("-n", "--n", type=positive_int, default=64, help="held-out problems to run")
    group.add_argument(
        "--levels", type=level, nargs="+", default=list(LEVELS), help="difficulty levels to draw from"
    )
    group.add_argument("--seed", type=non_negative_int, default=0, help="problem draw (and sampling) seed")


def _add_model_arguments(group) -> None:
    from effdecode.cli_types import device, model_name, positive_int
    from effdecode.workloads.models import REASONER_NAMES

    group.add_argument(
        "--model",
        type=model_name(REASONER_NAMES),
        default="target",
        help="a shipped reasoner or a checkpoint directory",
    )
    group.add_argument("--device", type=device, default="cpu", help="torch device of the model")
    group.add_argument(
        "--dtype",
        choices=["float32", "float64", "float16", "bfloat16"],
        default="float32",
        help="model dtype",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's; 1 runs best on a busy small machine)",
    )
    group.add_argument(
        "--tp",
        type=positive_int,
        default=1,
        help="tensor-parallel ranks per model replica under torchrun (tp_plan='auto'); the problems are "
        "sharded over the WORLD_SIZE / tp replicas, rank 0 prints",
    )


def _add_generate_arguments(group) -> None:
    from effdecode.cli_types import (
        model_name,
        non_negative_int,
        positive_float,
        positive_int,
        probability,
        slot_count,
    )
    from effdecode.workloads.models import REASONER_NAMES

    group.add_argument(
        "--slots",
        type=slot_count,
        default="auto",
        help="problems decoded at once (DecodeConfig.max_slots): waiting problems take the slots of finished "
        "ones; 'auto' fits as many as free memory holds",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="problems per generate_batch call (default: all problems in one call)",
    )
    group.add_argument(
        "--max-new-tokens", type=positive_int, default=400, help="new tokens per problem at most"
    )
    group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    group.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass")
    group.add_argument("--top-k", type=non_negative_int, default=0, help="top-k sampling (0: off)")
    group.add_argument(
        "--draft",
        nargs="?",
        type=model_name(REASONER_NAMES),
        const="draft",
        default=None,
        help="speculative decoding with a draft model (the shipped 'draft' without a value, or a checkpoint "
        "directory; default: off)",
    )
    group.add_argument(
        "--num-draft-tokens", type=positive_int, default=4, help="draft tokens per step with --draft"
    )
    group.add_argument(
        "--prompt-lookup",
        nargs="?",
        type=positive_int,
        const=4,
        default=None,
        help="n-gram drafts of this length (4 without a value; default: off)",
    )


def _add_decode_config_arguments(group) -> None:
    from effdecode.cli_types import (
        escaped_text,
        non_negative_int,
        optional,
        positive_int,
        unit_interval,
    )

    group.add_argument(
        "--kv-budget",
        type=optional(positive_int),
        default=None,
        help="KV entries kept per row and layer (default: none, the full cache)",
    )
    group.add_argument(
        "--kv-policy", choices=KV_POLICIES, default="streaming", help="which KV entries to keep"
    )
    group.add_argument("--kv-window", type=non_negative_int, default=32, help="recent entries always kept")
    group.add_argument("--kv-sinks", type=non_negative_int, default=4, help="first entries always kept")
    group.add_argument(
        "--compress-every", type=positive_int, default=64, help="entries a row gains between compactions"
    )
    group.add_argument("--kv-think-only", action="store_true", help="evict inside the thinking span first")
    group.add_argument(
        "--thinking-budget",
        type=optional(non_negative_int),
        default=None,
        help="thinking tokens per row, then the end of thinking is forced (default: none, unlimited)",
    )
    group.add_argument(
        "--think-end-prefix",
        type=escaped_text,
        default=THINK_END_PREFIX,
        help="text forced before </think> when the thinking budget runs out; backslash escapes are decoded "
        "(default: %(default)r)",
    )
    group.add_argument("--early-exit", action="store_true", help="DEER early exit of thinking")
    group.add_argument(
        "--early-exit-threshold", type=unit_interval, default=0.95, help="probe confidence that ends thinking"
    )
    group.add_argument(
        "--early-exit-replace",
        action="store_true",
        help="the probe replaces the trigger (DEER) instead of following it",
    )
    group.add_argument(
        "--early-exit-triggers",
        type=escaped_text,
        nargs="+",
        default=list(EARLY_EXIT_TRIGGERS),
        help="texts after which a row probes",
    )
    group.add_argument(
        "--compile", action="store_true", help="compiled decode steps (compile time not counted as decoding)"
    )


def _add_output_arguments(group) -> None:
    from effdecode.cli_types import non_negative_int

    group.add_argument("--json", action="store_true", help="print one JSON object")
    group.add_argument("--show", type=non_negative_int, default=0, help="print the first N completions")
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar (requests done, tokens/s) on stderr"
    )


def _add_sweep_arguments(group) -> None:
    from effdecode.cli_types import non_negative_int, positive_int, unit_interval

    group.add_argument("--sweep", action="store_true", help="run the grid and write a table and a plot")
    group.add_argument("--out", default="eval-sweep", help="directory of the sweep's table and plot")
    group.add_argument(
        "--sweep-kv-budgets",
        type=positive_int,
        nargs="+",
        default=list(SweepGrid.kv_budgets),
        help="KV budgets of the sweep",
    )
    group.add_argument(
        "--sweep-kv-policies",
        nargs="+",
        choices=KV_POLICIES,
        default=list(KV_POLICIES),
        help="KV policies of the sweep",
    )
    group.add_argument(
        "--sweep-thinking-budgets",
        type=non_negative_int,
        nargs="+",
        default=list(SweepGrid.thinking_budgets),
        help="thinking budgets of the sweep",
    )
    group.add_argument(
        "--sweep-thresholds",
        type=unit_interval,
        nargs="+",
        default=list(SweepGrid.early_exit_thresholds),
        help="early-exit thresholds of the sweep",
    )


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """:class:`EvalOptions` from parsed ``effdecode eval`` flags."""
    return EvalOptions(
        n=args.n,
        levels=tuple(args.levels),
        seed=args.seed,
        batch_size=args.batch_size,
        slots=getattr(args, "slots", "auto"),
        progress_bar=not getattr(args, "no_progress", True),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        kv_budget=args.kv_budget,
        kv_policy=args.kv_policy,
        kv_window=args.kv_window,
        kv_sinks=args.kv_sinks,
        compress_every=args.compress_every,
        kv_think_only=args.kv_think_only,
        thinking_budget=args.thinking_budget,
        think_end_prefix=args.think_end_prefix,
        early_exit=args.early_exit,
        early_exit_threshold=args.early_exit_threshold,
        early_exit_replace=args.early_exit_replace,
        early_exit_triggers=tuple(args.early_exit_triggers),
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        prompt_lookup=args.prompt_lookup,
        compile=getattr(args, "compile", False),
    )


def main(args: argparse.Namespace) -> int:
    """Run ``effdecode eval`` with parsed flags; the exit status.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process joins ``torch.distributed`` (gloo, or NCCL with
    ``--device cuda``, each process on GPU ``LOCAL_RANK``), groups of ``--tp`` ranks form one model replica,
    the problems are sharded over the replicas and rank 0 prints what one process would.
    """
    options = options_from_args(args)
    options.decode_config()  # bad DecodeConfig values fail here, before any model loads
    self_consistency = eval_consistency.wanted(args)  # --samples / --consistency checked before loading too
    tp = getattr(args, "tp", 1)
    topology = init_from_env(tp, args.device)
    if topology.tp > 1 and topology.tp != topology.world_size:
        raise ValueError(
            f"--tp {topology.tp} with {topology.world_size} processes: transformers shards a tp_plan model "
            "over all torchrun ranks, so a tensor-parallel replica must span the whole job; use --tp "
            f"{topology.world_size}, or --tp 1 for {topology.world_size} data-parallel replicas"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    if topology.distributed and device == "cuda":
        device = f"cuda:{topology.local_rank}"
    dtype = getattr(torch, args.dtype)
    model, tokenizer = _resolve_model(args.model, device, dtype, tp=topology.tp)
    draft_model = None
    if options.draft is not None:  # replicated on every rank, next to the target
        draft_model, _ = _resolve_model(options.draft, str(model.device), dtype)
    if self_consistency:  # k samples per problem, voted (effdecode.eval_consistency)
        return eval_consistency.main(args, model, tokenizer)
    warm = replace(
        options, n=1, max_new_tokens=2, batch_size=1, kv_budget=None, thinking_budget=None, progress_bar=False
    )
    run_eval(model, tokenizer, replace(warm, early_exit=False), draft_model=draft_model)  # one-time setup
    if args.sweep:
        grid = SweepGrid(
            kv_budgets=tuple(args.sweep_kv_budgets),
            kv_policies=tuple(args.sweep_kv_policies),
            thinking_budgets=tuple(args.sweep_thinking_budgets),
            early_exit_thresholds=tuple(args.sweep_thresholds),
        )
        log = (lambda *a, **k: None) if args.json else print
        rows = run_sweep(
            model, tokenizer, options, grid, args.out, draft_model=draft_model, log=log, topology=topology
        )
        if args.json and topology.is_main:
            print(json.dumps(rows))
        return 0
    result = run_eval(model, tokenizer, options, draft_model=draft_model, topology=topology)
    if not topology.is_main:
        return 0
    if args.json:
        print(json.dumps(_finite(result.to_dict(completions=args.show > 0))))
    else:
        print(format_result(result))
        problems = generate_problems(options.n, levels=options.levels, seed=options.seed, split="test")
        for problem, completion in list(zip(problems, result.completions, strict=True))[: args.show]:
            print(f"---\n{problem.prompt}{completion}")
    return 0


def _finite(value):
    """JSON has no NaN or infinity: such floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
