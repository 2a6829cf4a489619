"""Options that only effdecode knows about (everything else is a regular ``generate`` argument)."""

from __future__ import annotations

from dataclasses import dataclass

from effdecode.ops.backend import BACKENDS


@dataclass
class DecodeConfig:
    """effdecode-only decoding options.

    Given to :func:`effdecode.patch` (``config=``) or per call as
    ``model.generate(..., decode_config=DecodeConfig(...))``; a per-call config replaces the patched one.

    Parameters
    ----------
    attn_backend : str
        Attention implementation over the slot cache: ``"auto"`` (Triton on CUDA, the torch reference
        elsewhere), ``"torch"``, ``"triton"`` or ``"cuda"`` (the compiled extension where it has the op,
        else Triton). The environment variable ``EFFDECODE_BACKEND`` overrides it for every op.
    draft_length : str, optional
        ``"adaptive"``: in speculative decoding each row's draft length follows its own acceptance history
        (overrides ``num_assistant_tokens_schedule``). None follows the generate arguments.
    """

    attn_backend: str = "auto"
    draft_length: str | None = None

    def __post_init__(self) -> None:
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"DecodeConfig.attn_backend={self.attn_backend!r}; expected one of {BACKENDS}")
        if self.draft_length not in (None, "adaptive"):
            raise ValueError(f"DecodeConfig.draft_length={self.draft_length!r}; expected None or 'adaptive'")
