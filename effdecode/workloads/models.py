"""The shipped reasoner models (a target and its draft) and their architectures.

Both are trained as ``Qwen2ForCausalLM`` by ``benchmarks/reasoning/train.py`` and shipped as the identical
``LlamaForCausalLM`` (q/k/v biases, zero o_proj bias; fp16 safetensors) with the workload tokenizer under
``effdecode/workloads/models/<name>/``. Llama because ``AutoTokenizer`` would load a ``qwen2`` checkpoint's
tokenizer as ``Qwen2Tokenizer`` with a byte-level pre-tokenizer instead of the saved character one.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parent / "models"
REASONER_NAMES = ("target", "draft")

# Architectures (Qwen2 during training, tied embeddings); the vocabulary size comes from the tokenizer.
ARCHITECTURES: dict[str, dict] = {
    "target": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "draft": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
MAX_POSITIONS = 512


def _check_name(name: str) -> None:
    if name not in REASONER_NAMES:
        raise ValueError(f"unknown reasoner {name!r}; expected one of {REASONER_NAMES}")


def model_dir(name: str) -> Path:
    """Directory of the shipped ``name`` model (``"target"`` or ``"draft"``)."""
    _check_name(name)
    return MODELS_DIR / name


def reasoner_config(name: str, vocab_size: int, pad_token_id: int, eos_token_id: int):
    """The ``Qwen2Config`` of the ``name`` reasoner for a vocabulary of ``vocab_size`` tokens."""
    from transformers import Qwen2Config

    _check_name(name)
    return Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        **ARCHITECTURES[name],
    )


def load_tokenizer(name: str = "target"):
    """The workload tokenizer saved with the ``name`` model (left padding, ``<pad>`` and ``<eos>`` set)."""
    from transformers import AutoTokenizer

    directory = model_dir(name)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {directory}; train it with benchmarks/reasoning/train.py"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def load_reasoner(
    name: str = "target", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """Load a shipped reasoner offline.

    Parameters
    ----------
    name : str
        ``"target"`` (about 3M parameters) or ``"draft"`` (about 0.4M, for speculative decoding).
    device : str or torch.device
        Where to put the model.
    dtype : torch.dtype
        Weights are stored in float16 and cast to ``dtype`` (float32 by default, which CPUs run best).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode, its ``generation_config`` carrying the pad and EOS ids.
    tokenizer : transformers.PreTrainedTokenizerFast
        Left padding; ``pad_token_id`` and ``eos_token_id`` set.
    """
    from transformers import AutoModelForCausalLM

    directory = model_dir(name)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no model in {directory}; train it with benchmarks/reasoning/train.py")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True)
    model = model.to(device).eval()
    tokenizer = load_tokenizer(name)
    return model, tokenizer
