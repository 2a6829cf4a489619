"""Calling a compiled step's inductor graph without going through dynamo on every call.

A compiled step's inputs never change: every call passes the same static buffers, cache buffers and weights
(:class:`~effdecode.generation.graphs.DecodeGraphs` drops its steps when anything could change them). For
such a frame dynamo's entry is pure overhead: its eval-frame hook, the cache lookup, and the generated
bytecode that fetches every weight through ``nn.Module`` attribute chains to hand it to the graph. On the
2-core CPU that measured about 0.4 ms per call for a 4-layer model, a quarter of a whole compiled step.

:class:`CapturingInductor` is a ``torch.compile`` backend that compiles with inductor exactly as
``backend="inductor"`` does, and keeps the compiled graph with the tensors its inputs are bound to. After
the first call (through dynamo: it compiles), :meth:`CapturingInductor.direct` gives a callable that passes
those tensors to the compiled graph directly. It is given only when that is all dynamo's code would do:

- every graph input is a tensor (no Python number passed as a tensor, no random seed drawn per call);
- the traced frame has no side effect for dynamo to replay after the graph, but on objects it created and
  on transformers' output-capturing context variable, which each forward sets and resets (checked to be
  back at rest after the first call);
- the frame returns the graph's outputs, in order (checked against what the first call returned).

Otherwise (or where an older torch lacks a piece of this) the step keeps calling through dynamo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class DirectGraph:
    """An inductor-compiled graph and the tensors it reads: ``graph()`` is the frame's return value."""

    def __init__(self, compiled: Callable, inputs: list[torch.Tensor], single: bool) -> None:
        self.compiled = compiled
        self.inputs = inputs  # strong references: the step's buffers and the model's weights
        self.single = single

    def __call__(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.compiled(*self.inputs)
        return outputs[0] if self.single else tuple(outputs)


class CapturingInductor:
    """A ``torch.compile`` backend: inductor with ``config_patches``, keeping what :meth:`direct` needs.

    One instance per compiled function (it holds the last graph compiled for it).
    """

    def __init__(self, config_patches: dict) -> None:
        self.config_patches = dict(config_patches)
        self._captured: tuple[Callable, list[torch.Tensor], list, list] | None = None

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(graph_module, list(example_inputs), config_patches=self.config_patches)
        self._captured = _capture(graph_module, compiled)
        return compiled

    def direct(self, result) -> DirectGraph | None:
        """The direct call of the graph compiled last, given ``result``, what its first (dynamo) call
        returned; None where the direct call would not do exactly what dynamo's code does."""
        if self._captured is None:
            return None
        compiled, inputs, outputs, context_vars = self._captured
        if not all(_at_rest(context_var) for context_var in context_vars):
            return None  # the frame left state behind that only dynamo's code would keep up to date
        single = isinstance(result, torch.Tensor)
        returned = (result,) if single else result
        if not isinstance(returned, tuple) or len(returned) != len(outputs):
            return None
        for tensor, spec in zip(returned, outputs, strict=True):
            if not isinstance(tensor, torch.Tensor) or spec != (tensor.shape, tensor.dtype):
                return None
        self._captured = None
        return DirectGraph(compiled, inputs, single)


def _capture(graph_module: torch.fx.GraphModule, compiled: Callable) -> tuple | None:
    """(compiled, the real tensors of the graph's placeholders, its outputs' (shape, dtype), the context vars
    the frame sets and resets), or None when the graph reads anything but fixed tensors or its frame has a
    side effect that matters."""
    context_vars = _context_vars_or_none()
    if context_vars is None:
        return None
    inputs = []
    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        argument = node.meta.get("grapharg")
        if argument is None or getattr(argument, "pass_arg_as_tensor", True):
            return None
        tensor = argument.example
        if not isinstance(tensor, torch.Tensor):
            return None
        inputs.append(tensor)
    (outputs,) = [node.args[0] for node in graph_module.graph.nodes if node.op == "output"]
    if not isinstance(outputs, (tuple, list)):
        return None
    specs = []  # (shape, dtype) of each output (not the nodes: they hold fake tensors)
    for output in outputs:
        example = output.meta.get("example_value") if isinstance(output, torch.fx.Node) else None
        if not isinstance(example, torch.Tensor):
            return None
        specs.append((example.shape, example.dtype))
    return compiled, inputs, specs, context_vars


def _context_vars_or_none() -> list | None:
    """The side effects of the frame dynamo is compiling, if all are harmless to skip: the transformers
    ``CompileableContextVar`` objects it sets and resets (returned, to check they end at rest); None if
    the frame has another side effect on an object it did not create, or when that cannot be told."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew

        side_effects = InstructionTranslator.current_tx().output.side_effects
        context_vars = []
        for variable in side_effects.id_to_variable.values():
            if not side_effects.is_modified(variable):
                continue
            if isinstance(variable.mutation_type, (AttributeMutationNew, ValueMutationNew)):
                continue  # created by the frame (not reachable after it unless returned: checked)
            value = getattr(variable, "value", None)
            if type(value).__name__ != "CompileableContextVar":
                return None
            context_vars.append(value)
        return context_vars
    except (ImportError, AttributeError, AssertionError, RuntimeError):
        return None


def _at_rest(context_var) -> bool:
    """Whether a transformers ``CompileableContextVar`` is as no compiled frame has set it."""
    return getattr(context_var, "global_var", 0) is None and getattr(context_var, "compiling", True) is False
