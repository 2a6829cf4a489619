"""The ``progress_bar=True`` bar of :func:`effdecode.generate_batch`: requests done and tokens/s.

The engine calls :meth:`ProgressBar.rows_finished` with the request rows that just finished
and their new-token counts (``GenerationRequest.on_rows_finished``); the bar counts them. While the call
runs, tokens/s counts the finished requests' tokens (as vLLM's bar does); once it returns, the whole call's
(:meth:`finish`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm


class ProgressBar:
    """A tqdm bar over ``total`` requests (a no-op object when ``enabled`` is False).

    Use as a context manager; the bar closes on exit, also when the call raises.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self.bar = (
            tqdm(total=total, desc=f"Solving {total} requests", unit="request", dynamic_ncols=True)
            if enabled
            else None
        )

    def rows_finished(self, rows: np.ndarray, new_tokens: Sequence[int] | None = None) -> None:
        """Count the request rows ``rows`` (int64 ``[k]``) as done; ``new_tokens``: their token counts."""
        self.done += len(rows)
        if new_tokens is not None:
            self.tokens += int(sum(new_tokens))
        if self.bar is None:
            return
        if new_tokens is not None:
            self.bar.set_postfix_str(self._rate(), refresh=False)
        self.bar.update(len(rows))

    def finish(self, total_tokens: int, seconds: float) -> None:
        """The call returned: every request is done; show the call's tokens/s."""
        self.tokens = total_tokens
        if self.bar is None:
            return
        self.bar.set_postfix_str(self._rate(seconds), refresh=False)
        self.bar.update(self.total - self.done)
        self.done = self.total

    def _rate(self, seconds: float | None = None) -> str:
        seconds = time.perf_counter() - self.started if seconds is None else seconds
        return f"{self.tokens / seconds if seconds > 0 else 0.0:.1f} tokens/s"

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
