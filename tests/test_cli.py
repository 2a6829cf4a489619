"""``effdecode demo`` runs both engines and reports matching outputs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effdecode.cli import build_parser, main


def test_demo_prints_speed_and_matching_outputs(capsys):
    status = main(
        ["demo", "--batch-sizes", "1", "3", "--new-tokens", "12", "--prompt-len", "8", "--layers", "2"]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "3"]
    for row in rows:
        assert row[-1] == "yes" and row[-2].endswith("x") and float(row[1]) > 0 and float(row[2]) > 0


def test_python_dash_m_effdecode_shows_help():
    result = subprocess.run([sys.executable, "-m", "effdecode", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


# ------------------------------------------------------------------ options as a shell user meets them


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m effdecode ARGV`` in a subprocess, as a shell runs it (the worktree's effdecode)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "effdecode", *argv], capture_output=True, text=True, env=env, timeout=120
    )


BAD_VALUES = [
    (["eval", "-n", "-3"], "argument -n/--n: -3 must be >= 1"),
    (["eval", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["eval", "--slots", "0"], "argument --slots: 0 must be >= 1; expected 'auto' or an integer >= 1"),
    (["eval", "--slots", "many"], "argument --slots: 'many' is not an integer; expected 'auto'"),
    (["eval", "--levels", "7"], "argument --levels: 7 is not in 1..4"),
    (["eval", "--kv-budget", "-5"], "argument --kv-budget: -5 must be >= 1"),
    (["eval", "--max-new-tokens", "x"], "argument --max-new-tokens: 'x' is not an integer"),
    (["eval", "--top-p", "1.5"], "argument --top-p: 1.5 is not in (0, 1]"),
    (["eval", "--temperature", "0"], "argument --temperature: 0.0 must be > 0"),
    (["eval", "--early-exit-threshold", "2"], "argument --early-exit-threshold: 2.0 is not in [0, 1]"),
    (["eval", "--device", "gpuz"], "argument --device: 'gpuz' is not a torch device"),
    (["eval", "--model", "no/such/dir"], "argument --model: 'no/such/dir' is neither one of"),
    (["eval", "--kv-policy", "lru"], "argument --kv-policy: invalid choice: 'lru'"),
    (["eval", "--sweep-thinking-budgets", "8", "-1"], "argument --sweep-thinking-budgets: -1 must be >= 0"),
    # Fine one by one, not together: DecodeConfig's own check, before any model loads.
    (["eval", "--kv-budget", "10"], "kv_budget=10 is smaller than kv_sinks + kv_window"),
    (["eval", "--draft", "--prompt-lookup", "3"], "either a draft model"),
    (["demo", "--batch-sizes", "2", "0"], "argument --batch-sizes: 0 must be >= 1"),
    (["demo", "--new-tokens", "-1"], "argument --new-tokens: -1 must be >= 1"),
]


def _assert_usage_error(returncode: int, stdout: str, stderr: str, argv: list[str], message: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("usage: effdecode " + argv[0])
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr
    assert stdout == ""


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES)
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    _assert_usage_error(exit_info.value.code, captured.out, captured.err, argv, message)


@pytest.mark.parametrize("case", [0, 12], ids=["bad-value", "bad-combination"])
def test_bad_values_in_a_shell_print_one_line_and_exit_2(case):
    argv, message = BAD_VALUES[case]
    result = _run_cli(*argv)
    _assert_usage_error(result.returncode, result.stdout, result.stderr, argv, message)


def _option_help(command: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text shown under one option, as ``--help`` prints it."""
    formatter = command._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


def test_every_option_has_help_that_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"demo", "eval"}
    for name, command in commands.choices.items():
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = _option_help(command, action)
            assert action.help, f"effdecode {name} {action.option_strings[-1]} has no help"
            assert "default" in text, f"effdecode {name}: {text!r} does not show the default"
    evaluate = commands.choices["eval"]
    assert "(default: auto)" in _option_help(evaluate, _action(evaluate, "slots"))
    assert "(default: all problems in one call)" in _option_help(evaluate, _action(evaluate, "batch_size"))


def _action(command: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(action for action in command._actions if action.dest == dest)


def test_think_end_prefix_reaches_the_decode_config():
    from effdecode.eval import options_from_args

    args = build_parser().parse_args(
        ["eval", "--thinking-budget", "8", "--think-end-prefix", r"\nTime is up.\n"]
    )
    assert options_from_args(args).decode_config().think_end_prefix == "\nTime is up.\n"
    args = build_parser().parse_args(["eval", "--thinking-budget", "8"])
    assert options_from_args(args).decode_config().think_end_prefix == "\n"  # the workload's trace format


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--slots SLOTS problems decoded at once", "(default: auto)", "(default: cpu)"):
        assert shown in text
    assert "--think-end-prefix" in text and "(default: '\\n')" in text
