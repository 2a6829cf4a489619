"""Per-step logits processing in transformers' order.

Repetition penalty, then EOS blocking for ``min_length``/``min_new_tokens``, then the user's
``LogitsProcessor`` list, then (sampling only) temperature, top-k, top-p and min-p. Scores are float32, as in
transformers, whatever the model's dtype.
"""

from __future__ import annotations

import functools
import inspect

import torch

from effdecode.generation.compiled import samples_in_graph
from effdecode.generation.request import GenerationRequest
from effdecode.generation.streams import draw, draw_base_seed, row_seeds
from effdecode.generation.user_hooks import apply_processors_by_length
from effdecode.ops.backend import resolve_backend
from effdecode.ops.sampling import sample_from_scores, sample_tokens, warp_logits


@functools.cache
def penalty_skips_padding() -> bool:
    """Whether the installed transformers' ``generate`` exempts left-padding from ``repetition_penalty``.

    transformers 5.24 builds ``RepetitionPenaltyLogitsProcessor(prompt_ignore_length=<pad columns per row>)``;
    older releases (5.17) penalise every column of ``input_ids``, padding included. effdecode follows
    whichever is installed.
    """
    from transformers.generation.utils import GenerationMixin

    try:
        return "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor)
    except (OSError, TypeError):  # no source shipped: the processor accepting per-row lengths tells
        from transformers import RepetitionPenaltyLogitsProcessor

        try:
            RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.zeros(1, dtype=torch.long))
        except (ValueError, TypeError):
            return False
        return True


def apply_repetition_penalty(
    scores: torch.Tensor, history: torch.Tensor, penalty: float, skip_columns: torch.Tensor | None = None
) -> torch.Tensor:
    """Divide positive (multiply negative) scores of tokens already in ``history`` by ``penalty``.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, V]`` float.
    history : torch.Tensor
        int64 ``[B, L]``, each row's tokens so far (left padding included, as transformers keeps it).
    penalty : float
        transformers' ``repetition_penalty``.
    skip_columns : torch.Tensor, optional
        int ``[B]``: the first ``skip_columns[b]`` columns of row ``b`` (its left padding) are not penalised.

    Returns
    -------
    torch.Tensor
        ``[B, V]`` penalised scores (a new tensor).
    """
    vocab = scores.shape[-1]
    # Ids outside the scores' vocabulary (and skipped columns) go to an extra column that is dropped after.
    history = history.clamp(max=vocab)
    if skip_columns is not None:
        columns = torch.arange(history.shape[1], device=history.device)
        history = history.masked_fill(columns[None, :] < skip_columns[:, None], vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = torch.gather(padded, 1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, history, seen)[:, :vocab]


class LogitsPipeline:
    """Turns a step's raw logits into processed scores and chooses each row's next token.

    Parameters
    ----------
    request : GenerationRequest
        The validated call.
    device : torch.device
        Where the scores live.
    slots : int, optional
        Slots of the call (default: one per row).
    streams : tuple of torch.Tensor, optional
        int64 ``[S]`` (``S >= slots``) seed and offset buffers to hold the slots' random streams, when
        compiled steps sample in their graphs from those same (static) buffers; default: the pipeline's own.
    """

    def __init__(
        self,
        request: GenerationRequest,
        device: torch.device,
        slots: int | None = None,
        streams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.request = request
        slots = request.batch_size if slots is None else slots
        self.prompt_width = request.input_ids.shape[1]
        self.eos_ids = torch.tensor(request.eos_token_ids, dtype=torch.long, device=device)
        self.needs_history = request.repetition_penalty != 1.0 or bool(request.logits_processors)
        # Left-padding columns per slot that repetition_penalty leaves alone (as the installed transformers).
        self.penalty_skip: torch.Tensor | None = None
        if request.repetition_penalty != 1.0 and penalty_skips_padding():
            self.penalty_skip = torch.zeros(slots, dtype=torch.long, device=device)
        # Where Triton runs (CUDA, or forced), sampling is one sort-free kernel launch with in-kernel Philox.
        # With continuous batching (max_slots) the torch path inverts the CDF at a counter-based draw. Both
        # draw from per-request streams (effdecode.generation.streams) whose base seed comes from torch's
        # generator, so torch.manual_seed still reproduces a call and a request's draws do not depend on its
        # batch, slot or admission order. Otherwise the torch path (CPU) draws as transformers does
        # (torch.multinomial over the batch), so a seeded call whose rows all run to the end gives
        # transformers' own tokens. Compiled steps (DecodeConfig.compile) draw from the streams too; where
        # they sample in their graphs (samples_in_graph) the torch draw is used everywhere, so that compiled
        # and eager steps draw alike.
        self.kernel_sampler = (
            request.do_sample
            and not request.output_scores
            and not samples_in_graph(request)
            and resolve_backend("auto", device, has_cuda_op=False, has_triton_op=True) == "triton"
        )
        config = request.decode_config
        self.streams = request.do_sample and (
            self.kernel_sampler or config.max_slots is not None or config.compile
        )
        if request.do_sample:
            # (drawn after transformers' would-be draws only where they cannot matter: see above)
            needs_seed = self.streams or request.speculation is not None or request.thinking is not None
            self.base_seed = draw_base_seed() if needs_seed else 0
            if streams is not None:
                self.seeds, self.offsets = streams
            else:
                self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
                self.offsets = torch.zeros(slots, dtype=torch.long, device=device)
        if self.kernel_sampler:
            params = request.sampling
            self.temperature = torch.full((slots,), params.temperature, device=device)
            self.top_k = torch.full((slots,), params.top_k or 0, dtype=torch.int32, device=device)
            self.top_p = torch.full(
                (slots,), params.top_p if params.top_p is not None else 1.0, device=device
            )
            self.min_p = torch.full((slots,), params.min_p or 0.0, device=device)
        self._eos_columns: torch.Tensor | None = None  # bool [V], built on the first step
        if slots == request.batch_size:  # (a pipeline used without the loop: every row in its own slot)
            rows = torch.arange(slots, device=device)
            self.admit(rows, rows, request.prompt_lens.to(device))

    def admit(self, slots: torch.Tensor, requests: torch.Tensor, prompt_lens: torch.Tensor) -> None:
        """Slots ``slots`` (int64 ``[A]``) now hold request rows ``requests`` with ``prompt_lens``: their
        penalty padding and random streams."""
        if self.penalty_skip is not None:
            self.penalty_skip[slots] = self.prompt_width - prompt_lens.long()
        if self.request.do_sample:
            self.seeds[slots] = row_seeds(self.base_seed, requests)
            self.offsets[slots] = 0

    def _eos_column_mask(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        if self._eos_columns is None:
            self._eos_columns = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            # An EOS id outside the scores' vocabulary can never be chosen, so there is nothing to block
            # (transformers' min-length processors match ids against the vocabulary the same way).
            in_vocab = self.eos_ids[(self.eos_ids >= 0) & (self.eos_ids < vocab_size)]
            self._eos_columns[in_vocab] = True
        return self._eos_columns

    def process(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None,
        new_tokens: torch.Tensor,
        user_views: list | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Processed float32 scores ``[B, V]`` for rows whose histories are ``history`` ``[B, L]``.

        ``new_tokens`` is int64 ``[B]``, tokens each row has generated so far. ``user_views``: transformers'
        full-batch ``input_ids`` per group of rows with one history length
        (:func:`~effdecode.generation.user_hooks.user_views_by_length`); user processors then see the whole
        batch, else the rows' ``history``.
        ``rows`` (int ``[B]``) are the rows' request indices (slots), None meaning every row of the request in
        order.
        """
        request = self.request
        scores = logits.to(dtype=torch.float32, copy=True)
        if request.repetition_penalty != 1.0:
            skip = self.penalty_skip
            if skip is not None and rows is not None:
                skip = skip.index_select(0, rows.long())
            elif skip is not None and skip.shape[0] != scores.shape[0]:
                raise RuntimeError("LogitsPipeline.process needs `rows` when only some rows are running")
            # Rows with fewer tokens than the history's width are left-filled with pad: not their tokens.
            extra = (history.shape[1] - self.prompt_width - new_tokens.long()).clamp(min=0)
            skip = extra if skip is None else skip + extra
            scores = apply_repetition_penalty(scores, history, request.repetition_penalty, skip)
        if request.eos_blocked_until > 0 and self.eos_ids.numel():
            blocked = (new_tokens < request.eos_blocked_until)[:, None]
            eos_columns = self._eos_column_mask(scores.shape[-1], scores.device)
            scores = scores.masked_fill(blocked & eos_columns[None, :], float("-inf"))
        if user_views is not None:
            scores = apply_processors_by_length(request.logits_processors, user_views, scores)
        else:
            for processor in request.logits_processors:
                scores = processor(history, scores)
        if request.do_sample and not self.kernel_sampler:
            scores = warp_logits(scores, request.sampling)
        return scores

    def process_columns(
        self, logits: torch.Tensor, new_tokens: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """Processed float32 scores ``[B, T, V]`` for a verify forward (speculative decoding).

        Column ``t`` of row ``b`` predicts the row's token number ``new_tokens[b] + t - padding[b]``, so EOS
        stays blocked per column until ``min_new_tokens``; warpers apply column by column. History-dependent
        processors never reach here (speculation is off when they are given).
        """
        request = self.request
        scores = logits.to(dtype=torch.float32, copy=True)
        if request.eos_blocked_until > 0 and self.eos_ids.numel():
            columns = torch.arange(scores.shape[1], device=scores.device)
            produced = new_tokens[:, None] + columns[None, :] - padding[:, None].long()
            blocked = (produced < request.eos_blocked_until)[:, :, None]
            eos_columns = self._eos_column_mask(scores.shape[-1], scores.device)
            scores = scores.masked_fill(blocked & eos_columns[None, None, :], float("-inf"))
        if request.do_sample:
            batch, num_cols, vocab = scores.shape
            scores = warp_logits(scores.reshape(batch * num_cols, vocab), request.sampling).view(
                batch, num_cols, vocab
            )
        return scores

    def choose(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """int64 ``[B]`` next tokens of slots ``rows``: argmax for greedy, a draw when sampling."""
        if not self.request.do_sample:
            return scores.argmax(dim=-1)
        if not self.streams:
            return sample_from_scores(scores)
        if not self.kernel_sampler:
            tokens = draw(scores, self.seeds[rows], self.offsets[rows])
            self.offsets[rows] += 1
            return tokens
        tokens = sample_tokens(
            scores,
            self.temperature[rows],
            self.top_k[rows],
            self.top_p[rows],
            self.min_p[rows],
            self.seeds[rows],
            self.offsets[rows],
        )
        self.offsets[rows] += scores.shape[-1]  # the kernel used counters [offset, offset + V) of each row
        return tokens
