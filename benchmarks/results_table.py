"""Merge pytest-benchmark JSON files and render them as markdown tables.

Usage::

    python benchmarks/results_table.py run1.json run2.json [--merge merged.json] [-o table.md]

Each benchmark becomes a row: its name, median time, and the ``extra_info`` fields that say what ran and how
fast (mode / engine / model / batch, tokens/s, ms per step, ``roofline_fraction``, GB/s, ...), whichever the
file has. One table per benchmark file (``fullname`` up to ``::``); the header gives device, versions and date
from ``machine_info["effdecode_environment"]`` (``benchmarks/conftest.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# extra_info fields shown, in this order, when any row of a table has them.
COLUMNS = (
    "mode",
    "engine",
    "impl",
    "policy",
    "model",
    "batch",
    "batch_size",
    "new_tokens",
    "tokens_per_s",
    "ms_per_step",
    "prefill_ms",
    "roofline_fraction",
    "copy_bandwidth_gbs",
    "achieved_GBps",
    "share_of_peak",
    "tokens_per_target_forward",
    "draft_acceptance_rate",
    "kv_peak_bytes",
    "eviction_share",
)


def merge(runs: list[dict]) -> dict:
    """One pytest-benchmark document holding every run's benchmarks (machine info of the first run)."""
    if not runs:
        raise ValueError("merge needs at least one benchmark JSON document")
    merged = {key: value for key, value in runs[0].items() if key != "benchmarks"}
    merged["benchmarks"] = [bench for run in runs for bench in run.get("benchmarks", [])]
    return merged


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int) and abs(value) >= 1e4:
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _header(document: dict) -> str:
    env = document.get("machine_info", {}).get("effdecode_environment") or {}
    if not env:
        return ""
    keys = ("device", "torch", "cuda", "triton", "transformers", "date")
    return ", ".join(f"{key} {env[key]}" for key in keys if env.get(key)) + "\n\n"


def table(document: dict) -> str:
    """Markdown for one pytest-benchmark document: a header line and one table per benchmark file."""
    by_file: dict[str, list[dict]] = {}
    for bench in document.get("benchmarks", []):
        source = bench.get("fullname", bench.get("name", "?")).split("::")[0]
        by_file.setdefault(source, []).append(bench)
    parts = [_header(document)]
    for source, benches in by_file.items():
        columns = [c for c in COLUMNS if any(c in b.get("extra_info", {}) for b in benches)]
        lines = [
            f"**{source}**\n",
            "| " + " | ".join(["benchmark", "median (ms)", *columns]) + " |",
            "|" + " --- |" * (2 + len(columns)),
        ]
        for bench in benches:
            stats = bench.get("stats") or {}
            median = stats.get("median")
            info = bench.get("extra_info", {})
            cells = [bench.get("name", "?"), _cell(median * 1e3 if median is not None else None)]
            cells += [_cell(info.get(c)) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--merge", type=Path, help="also write the merged JSON here")
    parser.add_argument("-o", "--output", type=Path, help="markdown file (default: stdout)")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.inputs if path.is_file()]
    if not runs:
        print("results_table: none of the input files exist", file=sys.stderr)
        return 1
    document = merge(runs)
    if args.merge:
        args.merge.write_text(json.dumps(document, indent=1))
    markdown = table(document)
    if args.output:
        args.output.write_text(markdown)
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
