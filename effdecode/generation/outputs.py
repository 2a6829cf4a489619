"""What a call returns besides the sequences: per-step scores/logits, the streamer, the statistics."""

from __future__ import annotations

import torch

from effdecode.generation.request import GenerationRequest
from effdecode.generation.state import DecodeState, Emission


class StepOutputs:
    """Collects ``output_scores``/``output_logits`` (full batch, row ``i`` always row ``i``; rows that left
    get zeros) and feeds the streamer."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.streamer = request.streamer
        self.batch_size = request.input_ids.shape[0]

    def start(self) -> None:
        if self.streamer is not None:
            self.streamer.put(self.request.input_ids.cpu())

    def record(self, state: DecodeState, emission: Emission, counts: torch.Tensor) -> None:
        """After a step's append: its scores/logits and its tokens (``counts`` per row) to the streamer."""
        rows = state.requests_long  # row i of the full batch is request i
        if self.request.output_scores and emission.scores is not None:
            scores = emission.scores
            self.scores.append(
                scores.new_zeros(self.batch_size, scores.shape[-1]).index_copy_(0, rows, scores)
            )
        if self.request.output_logits and emission.logits is not None:
            logits = emission.logits.float()
            self.logits.append(
                logits.new_zeros(self.batch_size, logits.shape[-1]).index_copy_(0, rows, logits)
            )
        if self.streamer is None:
            return
        if self.batch_size == 1:  # (speculation streams a batch of one only)
            self.streamer.put(emission.tokens[0, : int(counts[0])].cpu())
        else:  # one token per row: rows that left get padding
            tokens = torch.full((self.batch_size,), state.pad, dtype=torch.long)
            requests = torch.as_tensor(state.requests_host)
            self.streamer.put(tokens.index_copy_(0, requests, emission.tokens[:, 0].cpu()))

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
