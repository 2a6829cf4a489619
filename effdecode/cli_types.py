"""argparse value types for the ``effdecode`` command line: a bad value is a one-line usage error (exit 2).

Each function takes the option's text and returns the parsed value or raises
:class:`argparse.ArgumentTypeError`, which argparse prints after the usage line.
"""

from __future__ import annotations

import argparse
import codecs
from collections.abc import Callable, Sequence


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``[low, high]``."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    parse.__name__ = f"int in {low}..{high}"
    return parse


def slot_count(text: str) -> int | str:
    """``auto`` or an integer >= 1 (``DecodeConfig.max_slots``)."""
    if text.lower() == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}; expected 'auto' or an integer >= 1") from None


def optional(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    """``parse``, or None for ``none`` / ``full``."""

    def parse_or_none(text: str) -> int | None:
        return None if text.lower() in ("none", "full") else parse(text)

    parse_or_none.__name__ = parse.__name__
    return parse_or_none


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (``top_p``)."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    return text


def escaped_text(text: str) -> str:
    """Text with backslash escapes decoded (``\\n`` -> newline), as a shell cannot type a newline easily."""
    try:
        return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"bad escape in {text!r}: {error.reason}") from None


def model_name(choices: Sequence[str]) -> Callable[[str], str]:
    """One of ``choices`` (shipped models) or an existing directory."""

    def parse(text: str) -> str:
        from pathlib import Path

        if text in choices or Path(text).is_dir():
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is neither one of {tuple(choices)} nor a directory")

    parse.__name__ = "model"
    return parse
