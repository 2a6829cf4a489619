"""Data-parallel ``effdecode eval`` on the CPU: 2 processes x 1 thread against 1 process x 1 thread.

    PYTHONPATH=$PWD python benchmarks/data_parallel_eval.py [--n 32] [--repeats 2]

Runs the same held-out problems once per layout and repeat (interleaved, so background load hits both alike)
and writes ``benchmarks/results/<device>-data-parallel-<date>.json``: per run the command's wall time
(process start, model load and the rank-0 gather included), the ``generate`` throughput ``effdecode eval``
reports (aggregate over replicas: all tokens over the slowest replica's ``generate`` time) and the
accuracy, which must not change with the layout. The machine's load average is recorded before each run:
on a shared machine two processes compete with whatever else runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from device_info import device_name, environment  # noqa: E402


def run(processes: int, flags: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if processes == 1:
        command = [sys.executable, "-m", "effdecode", "eval", *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(processes), "-m", "effdecode", "eval", *flags]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return {
        "processes": processes,
        "threads_per_process": 1,
        "command_wall_s": round(wall, 2),
        "generate_wall_s": round(result["wall_time_s"], 2),
        "tokens_per_s": round(result["tokens_per_s"], 1),
        "new_tokens": round(result["mean_new_tokens"] * result["n"]),
        "accuracy": result["accuracy"],
        "load_average_before": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    flags = ["-n", str(args.n), "--batch-size", str(args.batch_size), "--threads", "1", "--json"]
    runs = []
    for _ in range(args.repeats):
        for processes in (1, 2):
            runs.append(run(processes, flags))
            print(runs[-1], flush=True)
    best = {
        p: min((r for r in runs if r["processes"] == p), key=lambda r: r["command_wall_s"]) for p in (1, 2)
    }
    summary = {
        "throughput_ratio_2p_over_1p": round(best[2]["tokens_per_s"] / best[1]["tokens_per_s"], 2),
        "command_wall_ratio_1p_over_2p": round(best[1]["command_wall_s"] / best[2]["command_wall_s"], 2),
        "accuracy_identical": len({r["accuracy"] for r in runs}) == 1,
    }
    print(summary)
    out = {
        "environment": environment(),
        "workload": {"eval_flags": flags, "model": "shipped target (float32)"},
        "runs": runs,
        "best_of_repeats": best,
        "summary": summary,
    }
    date = datetime.date.today().isoformat()
    path = ROOT / "benchmarks" / "results" / f"{device_name()}-data-parallel-{date}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
