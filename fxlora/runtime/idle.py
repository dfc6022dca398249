"""Compiled inference code that runs the plain base model while no adapter acts.

Gated code (what ``torch.compile`` sees) reads the adapter state from gate tensors only, so that a
state change never recompiles; it therefore computes every branch, multiplied by a zero gate when
the adapter is merged, disabled or inactive. For a graph root whose graph qualifies
(`skippable`), `GraphForward` builds a second code for the same call pattern: the eager code of
the state with no live adapter (`IDLE`), i.e. the base model's own layers
and nothing else. Compiled, without autograd (``torch.no_grad()`` / ``torch.inference_mode()``), in
evaluation mode, a call runs ``torch.cond(any gate open, gated code, base code)`` (`run_gated`):
one predicate per call (not per layer, as the opt-in ``guard_idle`` pass does), no recompile on a
state change (the predicate is data), and merged adapters cost the base model's time.

``torch.cond`` must capture both codes whole (it raises on a graph break inside) and takes
tensors in and out: a graph qualifies only when every node is a call known to be a pure tensor
computation (torch functions, ``operator``, tensor methods, no in-place op; modules of the
standard ``torch.nn`` kinds, ones a library integration declares pure (timm's norm layers,
transformers' activations: `fxlora.tracing.integrations.TraceHooks.pure_in_eval`) or adapted
layers, no `modules_to_save` module; a module that is a graph root of its own, called as a
module, whose evaluation graphs all qualify) and it returns one tensor computed by such a call.
Any other graph (a transformers model returning a cache object, say) keeps the gated code alone.
A call whose root has a module with hooks (when it is compiled: `IdleCode.hooks`) runs the
gated code alone too: a hook's side effect cannot run inside a ``torch.cond`` branch.

None of this code is built on a torch whose dynamo drops a compiled frame's state updates across a
``torch.cond`` (torch 2.14: `fxlora.runtime.cond_support.cond_keeps_state`); compiled inference
then runs the gated code.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.core.gates import EagerKey, GateState
from fxlora.core.layers import saved_meta, target_meta
from fxlora.passes.conditions import called_module, writes_in_place
from fxlora.tracing.boundaries import HookTables
from fxlora.tracing.integrations import TraceHooks, hooks_for
from fxlora.tracing.memo import FixedAnswers

__all__ = ["IDLE", "IdleCode", "skippable", "skippable_fixed", "run_gated", "any_gate_open"]

#: the eager key of the state in which no branch runs and no copy is selected
IDLE = EagerKey((), ())

class IdleCode(NamedTuple):
    """The base model's code for a call pattern (`run_gated`), and the hook tables of the root's
    modules, which must be empty for it to run (module docstring)."""

    fn: Callable[..., Any]
    hooks: HookTables


#: modules of these ``torch.nn`` submodules compute their output from their input and their own
#: tensors alone in evaluation mode
_PURE_NN = tuple(
    f"torch.nn.modules.{name}"
    for name in ("linear", "conv", "sparse", "normalization", "batchnorm", "dropout", "flatten", "activation", "pooling", "padding", "pixelshuffle", "upsampling", "channelshuffle", "distance")
)
_IMPURE_NN = (nn.MultiheadAttention,)
#: tensor methods that leave the tensor world or have effects
_IMPURE_METHODS = {"item", "tolist", "numpy", "backward", "register_hook", "retain_grad", "data_ptr", "record_stream", "share_memory_"}
#: functions drawing random numbers (``torch.cond`` branches must not)
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "multinomial", "normal", "poisson", "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "rrelu"}
#: calls whose result is not a tensor
_NOT_TENSOR = {"size", "dim", "numel", "stride", "element_size", "is_contiguous", "nelement", "ndimension", "get_device"}


#: ``graphs_of(module)``: the evaluation graphs of a module that is a graph root of its own (a
#: repeated block, `fxlora.planning.roots`), None for any other module
NestedGraphs = Callable[[nn.Module], Optional[Sequence[fx.Graph]]]


def _no_nested_graphs(module: nn.Module) -> None:
    return None


def _pure_module(module: nn.Module, hooks: TraceHooks, graphs_of: NestedGraphs) -> bool:
    """A standard module, one a library integration declares pure in evaluation mode
    (`TraceHooks.pure_in_eval`: timm's norm layers, transformers' activations), an adapted
    layer, or a graph root of its own whose evaluation graphs all qualify (`skippable`); a
    `modules_to_save` module is not (its copy is selected whenever its adapter is active, merged
    or not, so no state would skip anything)."""
    if saved_meta(module) is not None:
        return False
    if target_meta(module) is not None:
        return True
    nested = graphs_of(module)
    if nested is not None:
        return bool(nested) and all(skippable(graph, module, graphs_of) for graph in nested)
    if module.training and isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU)):
        return False  # a submodule left in train mode inside evaluation code draws random numbers
    if hooks.computes_purely(module):
        return True
    return type(module).__module__ in _PURE_NN and not isinstance(module, _IMPURE_NN)


def _pure_function(target: Any) -> bool:
    """A function of ``operator``, ``getattr`` (of a tensor's shape, say) or of torch."""
    if target is getattr:
        return True
    module = getattr(target, "__module__", None) or ""
    return module in ("_operator", "operator") or module.startswith("torch") or getattr(torch, getattr(target, "__name__", ""), None) is target


def _pure_node(node: fx.Node, root: nn.Module, hooks: TraceHooks, graphs_of: NestedGraphs) -> bool:
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if writes_in_place(node, root) or name in _RANDOM:
        return False
    if node.op == "call_module":
        return _pure_module(called_module(node, root), hooks, graphs_of)
    if node.op == "call_method":
        return name not in _IMPURE_METHODS
    return node.op == "call_function" and _pure_function(node.target)


def _returns_tensor(graph: fx.Graph) -> bool:
    """The graph returns one node, a module call or a torch function / tensor method that gives a
    tensor."""
    out = graph.output_node().args[0]
    if not isinstance(out, fx.Node) or out.op not in ("call_module", "call_function", "call_method"):
        return False
    name = out.target if isinstance(out.target, str) else getattr(out.target, "__name__", "")
    return name not in _NOT_TENSOR and out.target not in (operator.getitem, getattr)


_SKIPPABLE = FixedAnswers()


def skippable_fixed() -> ContextManager[None]:
    """While entered, `skippable` on this thread answers for each (graph, root) once: for work
    that changes no module, adapter, mode or traced graph between its questions (building the
    code of a model's graph roots one after another: a root asks about every block it calls,
    and each block asks about itself again)."""
    return _SKIPPABLE.fixed()


def skippable(graph: fx.Graph, root: nn.Module, graphs_of: NestedGraphs = _no_nested_graphs) -> bool:
    """Whether `graph` (a traced base graph of `root`) qualifies for `run_gated` (module
    docstring); `graphs_of` gives the evaluation graphs of the graph roots it calls as modules
    (one function within a `skippable_fixed`)."""

    def ask() -> bool:
        hooks = hooks_for(root)
        return _returns_tensor(graph) and all(_pure_node(n, root, hooks, graphs_of) for n in graph.nodes)

    return _SKIPPABLE.answer((graph, root), ask)


def any_gate_open(gates: GateState) -> torch.Tensor:
    """0-d bool tensor: does any adapter's branch act anywhere in the call (`gates`)."""
    return gates.scale_tensor.ne(0).any()


def run_gated(gated: Callable[..., Any], idle: Callable[..., Any], root: nn.Module, gates: GateState, args: tuple) -> Any:
    """``gated(root, gates, *args)`` if any gate is open, else ``idle(root, gates, *args)`` (the base
    model), decided at run time by ``torch.cond``.

    Requires: compiling, no autograd, `args` all tensors, both codes from a `skippable` graph."""
    return torch.cond(any_gate_open(gates), lambda *a: gated(root, gates, *a), lambda *a: idle(root, gates, *a), tuple(args))
