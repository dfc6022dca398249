"""Symbolic tracing for fxlora: which modules become graphs, and how one call pattern is traced.

A *graph root* is a module whose ``forward`` fxlora replaces by rewritten graph code. Inside a
root, only the ancestors of adapted modules are traced through; everything else (adapted layers,
`modules_to_save` modules and every module without an adapted layer inside) stays a leaf, one
``call_module`` node, so tracing costs little and touches little.

A traced graph is specialised to one *call pattern*: the root's ``training`` flag plus, per
argument, either "a tensor" (a placeholder) or a concrete Python value (``None``, a bool, an int,
a float or a str, baked in). `call_key` computes the pattern of a call; the runtime keeps one graph
per pattern seen, so a branch on ``mask is None`` or ``self.training`` is always taken the way the
call in hand takes it. A call with any other kind of argument runs the original forward eagerly.

Tracing never changes the model: training flags are restored, and a forward that would change a
traced module's attributes fails to trace (its graph could not reproduce that change).
"""

from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = [
    "TraceFailure",
    "TracedVariant",
    "LoraTracer",
    "call_key",
    "canonical_key",
    "trace_variant",
    "trace_through_ids",
    "short_error",
    "adopt_constants",
    "CONSTANT_PREFIX",
]

TENSOR = "T"
CallKey = tuple  # (training, positional kinds, sorted (name, kind) pairs)


class TraceFailure(Exception):
    """A module (or one call pattern of it) cannot be captured as a graph."""


@dataclass
class TracedVariant:
    """The base graph (no LoRA yet) of one call pattern of a root.

    ``inputs[i]`` says where the i-th placeholder's value comes from: a positional index or a
    keyword name of the call.
    """

    graph: fx.Graph
    inputs: tuple[Union[int, str], ...]
    constants: dict = None  # trace-time tensor constants the graph reads (see `adopt_constants`)


class LoraTracer(fx.Tracer):
    """Traces through exactly the modules in `trace_through` (by id); every other module is a leaf."""

    def __init__(self, trace_through: set[int]) -> None:
        super().__init__()
        self.trace_through = trace_through
        # Reading a buffer gives a graph node, not its current value baked in as a constant.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.trace_through


# ------------------------------------------------------------------ call patterns
def _kind(value: Any) -> Optional[Hashable]:
    if isinstance(value, torch.Tensor):
        return TENSOR
    if value is None or isinstance(value, (bool, int, str)):
        return (type(value).__name__, value)
    if isinstance(value, float) and value == value:
        return ("float", value)
    return None


def call_key(training: bool, args: tuple, kwargs: dict) -> Optional[CallKey]:
    """The call pattern of ``forward(*args, **kwargs)``, or None when an argument is neither a
    tensor nor a plain constant (such calls are not traced)."""
    kinds = []
    for a in args:
        k = _kind(a)
        if k is None:
            return None
        kinds.append(k)
    named = []
    for name in sorted(kwargs):
        k = _kind(kwargs[name])
        if k is None:
            return None
        named.append((name, k))
    return (training, tuple(kinds), tuple(named))


def _forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(type(module).forward).parameters.values())[1:]


def canonical_key(module: nn.Module, training: bool) -> CallKey:
    """The pattern of the plainest call: every parameter without a default given a tensor, in order."""
    required = [
        p
        for p in _forward_parameters(module)
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return (training, (TENSOR,) * len(required), ())


# ------------------------------------------------------------------ tracing
def trace_through_ids(root: nn.Module, interesting: Iterable[nn.Module]) -> set[int]:
    """Ids of `root` and of every module of its subtree that has an interesting module below it."""
    wanted = {id(m) for m in interesting}
    ids = {id(root)}
    for name, module in root.named_modules():
        if id(module) in wanted and name:
            parts = name.split(".")
            for i in range(1, len(parts)):
                ids.add(id(root.get_submodule(".".join(parts[:i]))))
    return ids


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bind(module: nn.Module, key: CallKey):
    """Split the call into concrete arguments (baked in) and tensor inputs (placeholders)."""
    params = _forward_parameters(module)
    _, pos_kinds, named_kinds = key
    concrete: dict[str, Any] = {}
    sources: dict[str, Union[int, str]] = {}
    given: dict[str, Any] = {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(pos_kinds) > len(positional):
        raise TraceFailure("extra positional arguments (*args) are not traced")
    for i, kind in enumerate(pos_kinds):
        given[positional[i].name] = (kind, i)
    by_name = {p.name: p for p in params}
    for name, kind in named_kinds:
        p = by_name.get(name)
        if p is None or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in given:
            raise TraceFailure(f"keyword argument {name!r} is not a named parameter of forward")
        given[name] = (kind, name)
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in given:
            kind, source = given[p.name]
            if kind == TENSOR:
                sources[p.name] = source
            else:
                concrete[p.name] = kind[1]
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
        else:
            raise TraceFailure(f"forward() call is missing the required argument {p.name!r}")
    return params, concrete, sources


def _drop_concrete_placeholders(graph: fx.Graph, params: list[inspect.Parameter], concrete: dict) -> None:
    """Remove the placeholders fx keeps for specialised arguments, and the asserts that check them
    (the runtime dispatches on the call pattern instead)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(params):
        raise TraceFailure("could not match the traced inputs to forward's parameters")
    assert_fns = {torch._assert, torch.fx._symbolic_trace._assert_is_none, operator.eq}
    for param, node in zip(params, placeholders):
        if param.name not in concrete:
            continue
        doomed, stack = [], [node]
        while stack:
            current = stack.pop()
            doomed.append(current)
            for user in current.users:
                if user.op != "call_function" or user.target not in assert_fns:
                    raise TraceFailure(f"specialised argument {param.name!r} flows into the graph")
                stack.append(user)
        for n in reversed(_topo_sorted(graph, doomed)):
            graph.erase_node(n)


def _topo_sorted(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    wanted = set(nodes)
    return [n for n in graph.nodes if n in wanted]


def _snapshot(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    return [(m, dict(m.__dict__)) for m in modules]


def _restore_if_changed(snapshot: list[tuple[nn.Module, dict[str, Any]]]) -> Optional[str]:
    changed = None
    for module, before in snapshot:
        now = module.__dict__
        if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
            changed = changed or type(module).__name__
            now.clear()
            now.update(before)
    return changed


_FX_CONSTANT = "_tensor_constant"
CONSTANT_PREFIX = "_fxlora_constant_"


def _take_constants(root: nn.Module, graph: fx.Graph) -> dict[str, torch.Tensor]:
    """Tensors fx computed at trace time and stored on `root` as ``_tensor_constantN`` (a tensor
    built from Python values inside forward): detach them from `root` and rename the graph's reads
    of them to unique names; the caller registers them (`adopt_constants`)."""
    taken: dict[str, torch.Tensor] = {}
    for node in graph.find_nodes(op="get_attr"):
        if node.target.startswith(_FX_CONSTANT) and node.target in root.__dict__:
            value = root.__dict__[node.target]
            name = f"{CONSTANT_PREFIX}{id(graph):x}_{node.target[len(_FX_CONSTANT):]}"
            taken[name] = value
            node.target = name
    for key in [k for k in root.__dict__ if k.startswith(_FX_CONSTANT)]:
        del root.__dict__[key]
    return taken


def adopt_constants(root: nn.Module, constants: dict[str, torch.Tensor]) -> None:
    """Register trace-time constants as non-persistent buffers of `root` (so they follow
    ``.to()`` and stay out of ``state_dict()``)."""
    for name, value in constants.items():
        if name not in root._buffers:
            root.register_buffer(name, value, persistent=False)


def trace_variant(
    root: nn.Module,
    trace_through: set[int],
    key: CallKey,
) -> TracedVariant:
    """Trace `root`'s class ``forward`` for the call pattern `key`; raise `TraceFailure` if it
    cannot be captured.

    Guarantees: the returned graph's placeholders are the tensor inputs of the pattern, in
    forward's parameter order; the model is left as it was (flags and attributes).
    """
    training, _, _ = key
    params, concrete, sources = _bind(root, key)
    flags = [(m, m.training) for m in root.modules()]
    traced_modules = [m for m in root.modules() if id(m) in trace_through]
    snapshot = _snapshot(traced_modules)
    graph: Optional[fx.Graph] = None
    try:
        root.train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = LoraTracer(trace_through).trace(root, concrete_args=dict(concrete))
    except TraceFailure:
        raise
    except Exception as exc:  # any failure of symbolic execution means "not traceable"
        raise TraceFailure(short_error(exc)) from exc
    finally:
        for module, flag in flags:
            module.training = flag
        constants = _take_constants(root, graph if graph is not None else fx.Graph())
        changed = _restore_if_changed(snapshot)
    if changed:
        raise TraceFailure(f"forward of {changed} changes the module's attributes")
    _drop_concrete_placeholders(graph, params, concrete)
    inputs = tuple(sources[p.name] for p in params if p.name in sources)
    graph.lint()
    return TracedVariant(graph=graph, inputs=inputs, constants=constants)


def modules_called(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.find_nodes(op="call_module"):
        counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def attributes_read(graph: fx.Graph) -> set[str]:
    return {node.target for node in graph.find_nodes(op="get_attr")}

