"""Tracing one call pattern of a graph root: `trace_variant` and the `TracedVariant` it gives.

A *graph root* is a module whose ``forward`` fxlora replaces by rewritten graph code. Inside a
root, only the ancestors of adapted modules are traced through (`trace_through_ids`); everything
else (adapted layers, `modules_to_save` modules and every module without an adapted layer inside)
stays a leaf, one ``call_module`` node, so tracing costs little and touches little. A traced graph
is specialised to one call pattern (`fxlora.tracing.call_keys`): the runtime keeps one graph per
pattern seen, so a branch on ``mask is None`` or ``self.training`` is always taken the way the call
in hand takes it.

The function traced is the class's ``forward``, seen through decorators an integration declares
transparent for the call in hand (`fxlora.tracing.integrations.TraceHooks.unwrap`); the call is
replayed as given (defaults apply as in Python), so ``*args``/``**kwargs`` parameters work.

Tracing never changes the model: training flags are restored, and a forward that would change a
traced module's attributes fails to trace (its graph could not reproduce that change). Plain
attribute values the trace read are recorded as guards (`fxlora.tracing.guards`).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.tracing.call_keys import (
    SELF, CallKey, Source, erase_ranks, erase_sizes, key_is_ranked, key_is_sized,
)
from fxlora.tracing.boundaries import NOTHING_INLINED, Inlined, traced_into
from fxlora.tracing.boundaries import inlined as inlined_modules
from fxlora.tracing.guards import Guard, guards_hold, make_guards
from fxlora.tracing.call_template import CallTemplate
from fxlora.tracing.integrations import TraceHooks, hooks_for
from fxlora.tracing.proxies import NotTraceable
from fxlora.tracing.tracer import CheckpointInTrace, LoraTracer, check_transparent
from fxlora.tracing.submodules import named_submodules, submodule
from fxlora.errors import TraceFailure

__all__ = [
    "traceable_parents",
    "TracedVariant",
    "trace_variant",
    "trace_through_ids",
    "short_error",
    "adopt_constants",
    "CONSTANT_PREFIX",
    "modules_called",
    "traced_modules",
]


@dataclass
class TracedVariant:
    """The base graph (no LoRA yet) of one call pattern of a root.

    ``inputs[i]`` says where the i-th placeholder's value comes from: a positional index or a
    keyword name of the call, a path ``(index or name, item, ...)`` into a tuple argument, or
    `SELF` (see `gather_inputs`). ``key`` is the pattern the graph is valid for (a ranked request
    that traced without ranks gives the rank-free pattern). ``guards`` are ``(object, names,
    reader, values)`` checks of the plain attribute values the graph depends on (`guards_hold`).
    """

    graph: fx.Graph
    inputs: tuple[Source, ...]
    constants: dict = field(default_factory=dict)  # trace-time tensor constants the graph reads (`adopt_constants`)
    key: Optional[CallKey] = None
    guards: tuple[Guard, ...] = ()
    #: the modules the graph traced through, as they were (`fxlora.tracing.boundaries.Inlined`)
    inlined: Inlined = NOTHING_INLINED
    #: ``(relative name, why)`` of modules that would be traced through but could not be, and are
    #: called as leaves instead (`trace_variant`)
    leaves: tuple[tuple[str, str], ...] = ()
    #: the output type the call rebuilds from the graph's dict output (``output_type(**out)``:
    #: transformers' ``ModelOutput``), or None: the graph returns the output itself
    output_type: Optional[type] = None

    def holds(self, root: nn.Module) -> bool:
        """The graph still computes what `root`'s forward would (`root`: the module this variant
        was traced for): the plain attributes it read kept their values and the modules it
        inlined gained no boundary."""
        return guards_hold(self.guards) and self.inlined.hold(root)


# ------------------------------------------------------------------ tracing
def trace_through_ids(root: nn.Module, interesting: Iterable[nn.Module]) -> set[int]:
    """Ids of `root` and of every module of its subtree that has an interesting module below it
    and no module boundary on the way (`fxlora.tracing.boundaries.boundary_of`): a module whose
    ``__call__`` does more than its forward is called, never traced through, as is a module an
    integration keeps whole (`TraceHooks.kept_whole`)."""
    hooks = hooks_for(root)
    ids, closed = {id(root)}, set()
    for chain in _ancestor_chains(root, interesting):
        for ancestor in chain:
            if id(ancestor) in ids:
                continue
            if id(ancestor) in closed or not traced_into(ancestor, hooks):
                closed.add(id(ancestor))
                break
            ids.add(id(ancestor))
    return ids


def traceable_parents(root: nn.Module, interesting: Iterable[nn.Module]) -> set[int]:
    """Ids of the parents of `interesting` modules that a graph of `root` could trace through: no
    module boundary and no forward wrapper no integration declares transparent
    (`fxlora.tracing.tracer.check_transparent`) on the way from `root`. A graph of `root` calls
    none of the interesting modules itself when this is empty (planning then skips tracing it)."""
    hooks = hooks_for(root)
    transparent: dict[int, bool] = {}

    def open_(module: nn.Module) -> bool:
        if id(module) not in transparent:
            transparent[id(module)] = traced_into(module, hooks) and _transparent(module, hooks)
        return transparent[id(module)]

    return {id(chain[-1] if chain else root) for chain in _ancestor_chains(root, interesting) if all(map(open_, chain))}


def _ancestor_chains(root: nn.Module, interesting: Iterable[nn.Module]) -> Iterator[list[nn.Module]]:
    """For each interesting module below `root`, its ancestors below `root`, outermost first."""
    wanted = {id(m) for m in interesting}
    for name, module in named_submodules(root):
        if id(module) in wanted and name:
            chain, owner = [], root
            for part in name.split(".")[:-1]:
                owner = submodule(owner, part)
                chain.append(owner)
            yield chain


def _transparent(module: nn.Module, hooks: TraceHooks) -> bool:
    try:
        check_transparent(type(module).forward, hooks, set(), module)
    except NotTraceable:
        return False
    return True


def _where(exc: BaseException) -> str:
    """`` (at file.py:line: source)`` for the innermost frame of model code (not torch's, not
    fxlora's) the failure came from; empty when there is none."""
    import linecache
    import os
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(os.path.dirname(__file__))  # the fxlora package
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith((torch_dir, own_dir)) and os.path.isfile(frame.filename):
            found = frame
    if found is None:
        return ""
    line = linecache.getline(found.filename, found.lineno).strip()
    return f" (at {os.path.basename(found.filename)}:{found.lineno}: {line[:80]})"


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _forward_function(root: nn.Module, hooks: TraceHooks, key: CallKey) -> Callable:
    """The class's ``forward`` seen through decorators an integration declares transparent for
    this call; a forward wrapped by anything else is not traced."""
    try:
        fn = check_transparent(type(root).forward, hooks, {name for name, _ in key[2]}, root)
    except NotTraceable as exc:
        raise TraceFailure(str(exc)) from None
    if not inspect.isfunction(fn):
        raise TraceFailure(f"forward is a {type(fn).__name__}, not a Python function")
    return fn


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
    tracer: Callable[[set[int], TraceHooks], LoraTracer] = LoraTracer,
    rank_free_first: bool = True,
) -> TracedVariant:
    """Trace `root`'s ``forward`` for the call pattern `key`; raise `TraceFailure` if it cannot be
    captured. A ranked `key` is first traced without ranks (the result then holds for any rank,
    ``variant.key`` says so), unless `rank_free_first` is False (the caller knows the module's
    code needs ranks: `fxlora.tracing.reuse.TraceCache`). A module traced through whose code cannot be traced is called as
    a leaf instead (``variant.leaves``), so that the rest of the root stays in the graph.

    Guarantees: the returned graph's placeholders are the pattern's tensors and handles (and the
    root itself where an opaque function takes it), sourced by ``variant.inputs``; the model is
    left as it was (flags and attributes).

    A forward that uses gradient checkpointing cannot be one graph (the graph would drop the
    checkpointing): that is a `TraceFailure`. While planning, fxlora then plans inside such a
    module; afterwards (a root switched checkpointing on after ``transform``, e.g. timm's
    ``set_grad_checkpointing()``) that call pattern runs the original forward, whose adapted layers
    compute their branches eagerly (and take part in checkpoint recomputation).

    A sized `key` (`fxlora.tracing.call_keys`) is first traced as the ranked pattern; only where
    that fails or needs leaves is the sized pattern traced, and kept if it needs fewer leaves.

    `tracer` makes the tracer (`fxlora.tracing.reuse` passes one that reads chosen attributes
    as graph nodes).
    """
    if key_is_sized(key):
        return _trace_sized(root, trace_through, key, tracer, rank_free_first)
    if key_is_ranked(key) and rank_free_first:
        try:
            return _trace(root, trace_through, erase_ranks(key), tracer)
        except TraceFailure:
            pass
    return _trace_with_leaves(root, trace_through, key, tracer)


def _trace_sized(root: nn.Module, trace_through: set[int], key: CallKey, tracer: Callable, rank_free_first: bool) -> TracedVariant:
    """`trace_variant` for a sized `key`: the ranked pattern's graph unless the sized one needs
    fewer leaves (code deciding on sizes 0 or 1 of its arguments, RWKV's ``x.size(1) == 1``)."""
    ranked: Optional[TracedVariant] = None
    try:
        ranked = trace_variant(root, trace_through, erase_sizes(key), tracer, rank_free_first)
    except TraceFailure:
        pass
    if ranked is not None and not ranked.leaves:
        return ranked
    try:
        sized = _trace_with_leaves(root, trace_through, key, tracer)
    except TraceFailure:
        if ranked is None:
            raise
        return ranked
    return sized if ranked is None or len(sized.leaves) < len(ranked.leaves) else ranked


class _ChildFailure(TraceFailure):
    """A failed trace, with the innermost module traced through that it came from (`module`;
    None: the root's own code)."""

    def __init__(self, message: str, module: Optional[nn.Module]) -> None:
        super().__init__(message)
        self.module = module


def _trace_with_leaves(root: nn.Module, trace_through: set[int], key: CallKey, make_tracer: Callable = LoraTracer) -> TracedVariant:
    """`_trace`; where the failure comes from a module traced through, again with that module a
    leaf (one ``call_module`` node: it runs its own ``__call__``, the adapted layers inside it
    compute eagerly or in a graph of their own), until the trace succeeds or fails in the root's
    own code. The modules made leaves, and why, are ``variant.leaves``."""
    leaves: dict[str, str] = {}
    while True:
        try:
            variant = _trace(root, trace_through, key, make_tracer)
        except _ChildFailure as exc:
            if exc.module is None or id(exc.module) not in trace_through:
                raise TraceFailure(str(exc)) from exc
            leaves[next(n for n, m in root.named_modules() if m is exc.module)] = str(exc)
            trace_through = trace_through - {id(m) for m in exc.module.modules()}
            continue
        variant.leaves = tuple(leaves.items())
        return variant


def traced_modules(root: nn.Module, trace_through: set[int], leaves: Iterable[tuple[str, str]] = ()) -> list[nn.Module]:
    """The modules of `root` a graph traced through: those of `trace_through` not inside one of
    the graph's `leaves` (`TracedVariant.leaves`)."""
    inside = {id(m) for name, _ in leaves for m in root.get_submodule(name).modules()}
    return [m for m in root.modules() if id(m) in trace_through and id(m) not in inside]


def _trace(root: nn.Module, trace_through: set[int], key: CallKey, make_tracer: Callable = LoraTracer) -> TracedVariant:
    training, _, _ = key
    hooks = hooks_for(root)
    call = CallTemplate(_forward_function(root, hooks, key), key)
    modules = list(root.modules())
    flags = [(m, m.training) for m in modules]
    through = [m for m in modules if id(m) in trace_through]  # `traced_modules`, no leaves yet
    snapshot = _snapshot(through)
    graph: Optional[fx.Graph] = None
    tracer = make_tracer(trace_through, hooks)
    try:
        if any(flag != training for _, flag in flags):  # (each module's flag is put back below)
            root.train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace_call(root, call)
    except TraceFailure as exc:
        raise _ChildFailure(str(exc), tracer.failed_in) from exc
    except CheckpointInTrace as exc:
        raise _ChildFailure(short_error(exc), tracer.failed_in) from exc
    except Exception as exc:  # any failure of symbolic execution means "not traceable"
        raise _ChildFailure(short_error(exc) + _where(exc), tracer.failed_in) from exc
    finally:
        for module, flag in flags:
            if module.training is not flag:  # nn.Module.__setattr__ costs: only where it changed
                module.training = flag
        constants = _take_constants(root, graph if graph is not None else fx.Graph())
        changed = _restore_if_changed(snapshot)
    if changed:
        raise TraceFailure(f"forward of {changed} changes the module's attributes")
    inputs = ((SELF,) if tracer._self_node is not None else ()) + tuple(slot.source for slot in call.slots)
    for node in graph.nodes:
        if node.name == "self":  # a child module called `self` (transformers' BertAttention.self)
            node._rename("self_module")
    graph.lint()
    return TracedVariant(
        graph=graph,
        inputs=inputs,
        constants=constants,
        key=key,
        guards=make_guards(through, hooks),
        inlined=inlined_modules(root, through),
        output_type=tracer.output_type,
    )


def modules_called(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.find_nodes(op="call_module"):
        counts[node.target] = counts.get(node.target, 0) + 1
    return counts
