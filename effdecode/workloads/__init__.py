"""A reasoning workload that runs anywhere: seeded arithmetic problems and tiny models trained on them.

- :func:`generate_problems`: seeded problems of levels 1-4 with a worked chain of thought in
  ``<think> ... </think>`` and ``Answer: N``; some traces re-check their result ("Wait, let me check:").
- :func:`build_tokenizer`: the character-level tokenizer (``<think>`` and ``</think>`` single tokens).
- :func:`load_reasoner`: the shipped ``"target"`` and ``"draft"`` models (Qwen2, fp16 safetensors), offline.
- :func:`extract_answer` / :func:`is_correct`: grading a completion.
"""

from effdecode.workloads.models import REASONER_NAMES, load_reasoner, load_tokenizer, model_dir
from effdecode.workloads.problems import (
    ANSWER_PREFIX,
    LEVELS,
    RECHECK_PHRASE,
    RECHECK_RATE,
    THINK_END,
    THINK_START,
    Problem,
    extract_answer,
    format_prompt,
    generate_problems,
    is_correct,
    is_held_out,
    thinking_text,
)
from effdecode.workloads.tokenizer import build_tokenizer, save_tokenizer

__all__ = [
    "ANSWER_PREFIX",
    "LEVELS",
    "RECHECK_PHRASE",
    "RECHECK_RATE",
    "REASONER_NAMES",
    "THINK_END",
    "THINK_START",
    "Problem",
    "build_tokenizer",
    "extract_answer",
    "format_prompt",
    "generate_problems",
    "is_correct",
    "is_held_out",
    "load_reasoner",
    "load_tokenizer",
    "model_dir",
    "save_tokenizer",
    "thinking_text",
]
