"""The arithmetic reasoning workload: problem generator, answer checking, tokenizer, shipped models."""

from __future__ import annotations

import re

import pytest
import torch

import effdecode
from effdecode.workloads import (
    LEVELS,
    RECHECK_PHRASE,
    THINK_END,
    THINK_START,
    build_tokenizer,
    extract_answer,
    generate_problems,
    is_correct,
    is_held_out,
    load_reasoner,
    model_dir,
    thinking_text,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: tiny models decode fastest so, and a busy CI machine does not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _value(expression: str) -> int:
    assert re.fullmatch(r"[0-9+*()]+", expression), expression
    return eval(expression)  # noqa: S307 - digits, + * and parentheses only


def test_generator_is_deterministic_and_seeded():
    first = generate_problems(24, seed=3)
    assert first == generate_problems(24, seed=3)
    assert [p.expression for p in first] != [p.expression for p in generate_problems(24, seed=4)]
    assert [p.level for p in first] == [LEVELS[i % 4] for i in range(24)]


def test_answers_and_traces_are_right():
    for problem in generate_problems(200, seed=1, split="train"):
        assert problem.answer == _value(problem.expression)
        assert problem.prompt == f"Q: {problem.expression}=?\n{THINK_START}"
        assert problem.completion.endswith(f"{THINK_END}\nAnswer: {problem.answer}")
        last_conclusion = re.findall(r"So (.+)=(\d+)\.", problem.thinking)[-1]
        assert int(last_conclusion[1]) == problem.answer
        assert (RECHECK_PHRASE in problem.thinking) == problem.rechecks
        assert extract_answer(problem.completion) == problem.answer and is_correct(problem, problem.text)


def test_traces_grow_with_difficulty_and_stay_short():
    tokenizer = build_tokenizer()
    means = []
    for level in LEVELS:
        problems = generate_problems(120, levels=[level], seed=0, split="train")
        lengths = [len(tokenizer(p.completion)["input_ids"]) for p in problems]
        means.append(sum(lengths) / len(lengths))
        assert max(lengths) < 400
    assert means == sorted(means)
    rechecks = [sum(p.rechecks for p in generate_problems(200, levels=[lv], seed=0)) for lv in LEVELS]
    assert rechecks[0] < rechecks[-1] and 0 < rechecks[0]


def test_held_out_split_is_disjoint_from_training():
    train = generate_problems(400, seed=0, split="train")
    test = generate_problems(100, seed=0, split="test")
    assert not any(is_held_out(p.expression) for p in train)
    assert all(is_held_out(p.expression) for p in test)
    assert not {p.expression for p in train} & {p.expression for p in test}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n3+4 c0 r\nSo 3+4=7.\n</think>\nAnswer: 7", 7),
        ("</think>\nAnswer: -12 and more", -12),
        ("\nSo 3+4=7.\nAnswer: 7", None),  # no end of thinking
        ("\nAnswer: 5\n</think>\nnothing", None),  # an answer inside thinking does not count
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_thinking_text():
    assert thinking_text("\nabc\n</think>\nAnswer: 1") == "\nabc\n"
    assert thinking_text("\nabc") == "\nabc"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(levels=[0]), "out of range"),
        (dict(levels=[5]), "out of range"),
        (dict(levels=[]), "empty"),
        (dict(split="dev"), "split"),
    ],
)
def test_generator_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_problems(4, **kwargs)
    with pytest.raises(ValueError, match="n="):
        generate_problems(-1)


def test_tokenizer_round_trip_and_think_tags(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    problem = generate_problems(1, levels=[4], seed=0)[0]
    ids = tokenizer(problem.text)["input_ids"]
    assert tokenizer.decode(ids) == problem.text
    assert len(tokenizer(THINK_START)["input_ids"]) == 1 and len(tokenizer(THINK_END)["input_ids"]) == 1
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(problem.text)["input_ids"] == ids
    assert (
        loaded.padding_side == "left" and loaded.pad_token_id is not None and loaded.eos_token_id is not None
    )
    text = loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True)
    assert text == problem.text  # the think tags survive skip_special_tokens, EOS does not


def test_unknown_reasoner_name():
    with pytest.raises(ValueError, match="unknown reasoner"):
        load_reasoner("huge")


@pytest.fixture(scope="module")
def reasoners():
    return load_reasoner("target"), load_reasoner("draft")


def test_shipped_models_are_small_fp16_files(reasoners, monkeypatch):
    (target, tokenizer), (draft, draft_tokenizer) = reasoners
    sizes = 0
    for name in ("target", "draft"):
        files = {path.name: path for path in model_dir(name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
        sizes += files["model.safetensors"].stat().st_size
    assert sizes < 10 * 2**20
    target_params = sum(p.numel() for p in target.parameters())
    draft_params = sum(p.numel() for p in draft.parameters())
    assert 2e6 < target_params < 6e6 and draft_params < 0.2 * target_params
    assert target.dtype == torch.float32 and not target.training
    assert tokenizer.get_vocab() == draft_tokenizer.get_vocab() and tokenizer.padding_side == "left"
    assert target.generation_config.eos_token_id == tokenizer.eos_token_id


def test_shipped_target_solves_problems(reasoners):
    (model, tokenizer), (draft, _) = reasoners
    problems = generate_problems(8, levels=[1, 2, 3], seed=11, split="test")
    encoded = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    kwargs = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=260
    )
    out = effdecode.generate(model, encoded["input_ids"], attention_mask=encoded["attention_mask"], **kwargs)
    width = encoded["input_ids"].shape[1]
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    solved = sum(is_correct(p, text) for p, text in zip(problems, texts, strict=True))
    assert solved >= 7, texts
    with_draft = effdecode.generate(
        model, encoded["input_ids"], attention_mask=encoded["attention_mask"], assistant_model=draft, **kwargs
    )
    assert torch.equal(with_draft, out)  # speculative greedy decoding is lossless
