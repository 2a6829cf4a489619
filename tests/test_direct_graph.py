"""Compiled graphs called without dynamo (``effdecode.generation.direct_graph``): given only when the direct
call does exactly what dynamo's code would, and then equal to it, input mutations included."""

from __future__ import annotations

import pytest
import torch

from effdecode.generation.direct_graph import CapturingInductor


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)


def _compiled(function, backend: CapturingInductor):
    return torch.compile(function, backend=backend, fullgraph=True, dynamic=False)


def test_direct_call_equals_dynamo_and_keeps_input_mutations():
    """A step-like function (weights read through a module, a buffer written in place, two outputs): the
    direct call returns what the function returns and writes the buffer as the function does, on inputs
    changed in place between calls."""
    layer = _Layer()
    tokens = torch.randn(4, 8)
    buffer = torch.zeros(3, 4, 8)
    step = torch.zeros((), dtype=torch.long)

    def function(tokens, buffer, step):
        hidden = torch.relu(layer.linear(tokens))
        buffer.index_copy_(0, step.view(1), hidden[None])
        step.add_(1)
        return hidden, hidden.sum(dim=-1).argmax()

    backend = CapturingInductor({"size_asserts": False})
    with torch.no_grad():
        first = _compiled(function, backend)(tokens, buffer, step)
        direct = backend.direct(first)
        assert direct is not None
        tokens.copy_(torch.randn(4, 8))
        hidden, chosen = direct()
        expected = torch.relu(layer.linear(tokens))
    torch.testing.assert_close(hidden, expected)
    assert int(chosen) == int(expected.sum(dim=-1).argmax())
    torch.testing.assert_close(buffer[1], expected)  # the second call's write, into slot 1
    assert int(step) == 2


def test_single_output_is_returned_as_a_tensor():
    layer = _Layer()
    tokens = torch.randn(2, 8)
    backend = CapturingInductor({})
    with torch.no_grad():
        first = _compiled(lambda x: layer.linear(x) * 2, backend)(tokens)
        direct = backend.direct(first)
        assert direct is not None
        out = direct()
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, first)


class _Recorder:
    seen = 0


def test_a_frame_with_side_effects_keeps_dynamo():
    """The frame sets an attribute of an object it did not create: dynamo's code replays that after the
    graph, a direct call would not, so there is none."""
    recorder = _Recorder()

    def function(x):
        recorder.seen = recorder.seen + 1
        return x * 2

    backend = CapturingInductor({})
    result = _compiled(function, backend)(torch.ones(3))
    assert recorder.seen == 1
    assert backend.direct(result) is None


@pytest.mark.parametrize("kind", ["python number", "input returned"])
def test_a_return_value_the_graph_does_not_produce_keeps_dynamo(kind):
    """The frame returns a Python number, or one of its inputs unchanged: dynamo's code builds that, not the
    graph, so there is no direct call."""
    x = torch.ones(3)

    def function(x):
        doubled = x * 2
        return (doubled, 3) if kind == "python number" else (doubled, x)

    backend = CapturingInductor({})
    result = _compiled(function, backend)(x)
    assert backend.direct(result) is None
