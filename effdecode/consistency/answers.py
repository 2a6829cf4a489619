"""A finished row's answer: a regex with one group, a callable on the decoded text, or token markers."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from effdecode.consistency.checks import answer_kind


class AnswerReader:
    """Turns a row's new tokens into its answer (a hashable) or None.

    Parameters
    ----------
    answer : str, re.Pattern, callable or (list[int], list[int])
        See :class:`~effdecode.config.DecodeConfig` ``answer``.
    tokenizer : optional
        Decodes the tokens for a regex or a callable (``skip_special_tokens=True``).
    """

    def __init__(self, answer: Any, tokenizer=None) -> None:
        self.kind = answer_kind(answer)
        if self.kind is None:
            raise ValueError("AnswerReader needs an answer (a regex, a callable or token markers)")
        if self.kind in ("regex", "callable") and tokenizer is None:
            raise ValueError(f"an answer {self.kind} reads decoded text: a tokenizer is needed")
        self.tokenizer = tokenizer
        self.pattern = re.compile(answer) if self.kind == "regex" and isinstance(answer, str) else answer
        self.function: Callable | None = answer if self.kind == "callable" else None
        if self.kind == "markers":
            self.start, self.end = list(answer[0]), list(answer[1])

    def __call__(self, tokens: Sequence[int]) -> Hashable | None:
        """The answer of a row whose new tokens are ``tokens`` (EOS and padding may be included)."""
        tokens = [int(t) for t in tokens]
        if self.kind == "markers":
            return _between_markers(tokens, self.start, self.end)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.kind == "callable":
            return self.function(text)
        matches = self.pattern.findall(text)
        return matches[-1].strip() if matches else None

    def read(self, rows_tokens: Sequence[Sequence[int]]) -> list[Hashable | None]:
        return [self(tokens) for tokens in rows_tokens]


def _find_last(tokens: list[int], marker: list[int]) -> int:
    """Index just past the last occurrence of ``marker`` in ``tokens``, or -1."""
    n = len(marker)
    for start in range(len(tokens) - n, -1, -1):
        if tokens[start : start + n] == marker:
            return start + n
    return -1


def _between_markers(tokens: list[int], start: list[int], end: list[int]) -> tuple[int, ...] | None:
    begin = _find_last(tokens, start)
    if begin < 0:
        return None
    rest = tokens[begin:]
    if end:
        n = len(end)
        for index in range(len(rest) - n + 1):
            if rest[index : index + n] == end:
                return tuple(rest[:index])
    return tuple(rest)
