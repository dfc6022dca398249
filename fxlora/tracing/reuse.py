"""Tracing identical roots once: `TraceCache`.

The blocks of a model (32 decoder layers of one class, built from one config) give the same
graph for the same call pattern: tracing each again is most of ``transform``'s time. A root's
*fingerprint* (`fingerprint`) is everything its trace can depend on: its class and the call
pattern; for every module of its subtree, its relative name, class, whether it is traced
through, its plain attribute values, its tuples of plain values, for a module traced through the
identity of every other object it holds (a config), and its tensors' shapes, dtypes and devices;
the values of the attributes the library integrations guard. Two roots with one fingerprint trace to the same
graph (its nodes name modules by relative path), so the second reuses the first's graph, inputs
and trace-time constants, with guards and the inlined-modules record made for its own modules.

Blocks that differ only in some plain values (transformers' ``layer_idx``, handed to the KV
cache) form a *family* (same fingerprint but for those values). For the first block of a family
that differs from the family's first one, those attributes (ints, floats or strs of one type in
both) are *lifted*: traced as graph nodes reading the attribute when the code runs
(`LiftedValue`), never as values baked in. A lifted value refuses every use that would decide
Python control flow or leave the graph (``bool``, ``hash``, ``int``, ``str``, iteration, indexing
with it: the trace then fails), and the lifted graph must equal, node for node, the first
block's own graph once the first block's values are put in its nodes (`same_graph`). Only then
does the family reuse it, for every block differing from the first in no other attribute (and
the blocks with the first one's values switch to it: one graph, so one build, for all);
otherwise each block is traced on its own, as before.

A cache lives for one pass over roots that changes no module between its traces: planning
(`fxlora.planning.plan.assign_paths`), a mode switch (`fxlora.runtime.install.prepare_all`), one
call meeting new patterns (`fxlora.runtime.forwards.GraphForward.traced`); a failure to trace is
remembered too, so identical untraceable roots fail once.
"""

from __future__ import annotations

import functools
from collections import Counter
import keyword
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.errors import TraceFailure
from fxlora.tracing.boundaries import inlined
from fxlora.tracing.call_keys import CallKey, key_is_ranked
from fxlora.tracing.guards import make_guards
from fxlora.tracing.integrations import TraceHooks, hooks_for
from fxlora.tracing.submodules import named_submodules
from fxlora.tracing.proxies import InfoProxy, NotTraceable, _SCALAR
from fxlora.tracing.traced import TracedVariant, trace_variant, traced_modules
from fxlora.tracing.tracer import LoraTracer

__all__ = ["TraceCache", "fingerprint", "module_values", "module_tensors", "LiftedValue", "same_graph"]

_PLAIN = (bool, int, float, str, type(None))
_LIFTABLE = (int, float, str)  # bool and None decide control flow by identity: never lifted

Place = tuple[str, str]  # (module path relative to the root, attribute name)


_PLAIN_TYPES = frozenset(_PLAIN)


def _plain_attributes(module: nn.Module) -> tuple:
    """`module`'s own attributes of plain values, by name (a float NaN, unequal to itself, left out)."""
    found = [(name, value) for name, value in module.__dict__.items() if type(value) in _PLAIN_TYPES and value == value]
    found.sort()  # by name: the names differ
    return tuple(found)


def module_tensors(module: nn.Module) -> tuple:
    """`module`'s own tensors' (name, (shape, dtype, device type)), None for a hole."""
    parameters, buffers = module._parameters, module._buffers
    if not parameters and not buffers:  # most modules of a tree (containers, activations, dropouts)
        return ()
    return tuple((n, None if t is None else (tuple(t.shape), t.dtype, t.device.type)) for table in (parameters, buffers) for n, t in table.items())


_TORCH_OWN = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (hooks, children, tensors)


def _frozen(value: Any) -> bool:
    """A value compared by value: plain, or a tuple / frozenset of such values."""
    if type(value) in (tuple, frozenset):
        return all(_frozen(v) for v in value)
    return type(value) in _PLAIN


def _other_attributes(module: nn.Module, traced_through: bool, is_root: bool = False, summary_of: Optional[dict[str, Callable[[Any], Any]]] = None) -> tuple:
    """`module`'s attributes a trace may bake in that are not plain values: tuples of plain values
    (a kernel size, a shape) by value; for a module traced through, every other object (a config)
    by identity, or by the summary an integration gives for it (`TraceHooks.attribute_summaries`).
    nn.Module's own bookkeeping aside, and a root's instance ``forward`` (fxlora's installed
    forward, once adapted): a root's trace follows its class's ``forward``."""
    summary_of = summary_of or {}
    found = []
    for name, value in module.__dict__.items():
        if name in _TORCH_OWN or type(value) in _PLAIN or (is_root and name == "forward"):
            continue
        if _frozen(value):
            found.append((name, value))
        elif traced_through:
            found.append((name, summary_of[name](value) if name in summary_of else id(value)))
    return tuple(sorted(found))


def module_values(module: nn.Module) -> tuple[tuple, tuple]:
    """`module`'s own plain attribute values and its tensors' (shape, dtype, device type)."""
    return _plain_attributes(module), module_tensors(module)


def _describe(root: nn.Module, trace_through: set[int], key: CallKey) -> Optional[tuple[Hashable, dict[Place, Any]]]:
    """``(family, values)``: the fingerprint with every plain value replaced by its type, and the
    plain values by place; None when some value cannot be hashed."""
    described = _describe_modules(root, trace_through)
    return None if described is None else ((key, described[0]), described[1])


def _describe_modules(root: nn.Module, trace_through: set[int]) -> Optional[tuple[Hashable, dict[Place, Any]]]:
    """`_describe` but for the call pattern (the same for every pattern of a root)."""
    hooks = hooks_for(root)
    summary_of = dict(hooks.attribute_summaries)
    parts: list[Any] = [type(root)]
    values: dict[Place, Any] = {}
    for name, module in named_submodules(root):
        plain = _plain_attributes(module)
        values.update(((name, attr), value) for attr, value in plain)
        kinds = tuple((attr, type(value)) for attr, value in plain)
        through = id(module) in trace_through
        parts.append((name, type(module), through, kinds, _other_attributes(module, through, not name, summary_of), module_tensors(module)))
        for obj, attr in hooks.guards(module):
            parts.append((attr, getattr(obj, attr, None)))
    family = tuple(parts)
    try:
        hash(family)
    except TypeError:
        return None
    return family, values


def fingerprint(root: nn.Module, trace_through: set[int], key: CallKey) -> Optional[Hashable]:
    """What a trace of `root` for `key` depends on (see the module docstring); None when some
    value cannot be compared (then nothing is reused)."""
    described = _describe(root, trace_through, key)
    return None if described is None else (described[0], tuple(described[1].items()))


# ------------------------------------------------------------------ lifted values
def _refuse(use: str):
    def refused(self: Any, *args: Any) -> Any:
        raise NotTraceable(f"a lifted attribute value is used as Python ({use}), which would bake it into the graph")

    return refused


class LiftedValue(InfoProxy):
    """An attribute value traced as a graph node (see the module docstring): ``isinstance`` sees
    the value's type; arithmetic and calls become graph nodes; every use that needs the value
    itself in Python raises `NotTraceable`."""

    def __init__(self, node: fx.Node, tracer: LoraTracer, cls: type) -> None:
        super().__init__(node, tracer)
        self._fxlora_cls = cls
        self.info = _SCALAR if cls in (int, float) else None

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # what isinstance() sees
        return self._fxlora_cls

    __bool__ = _refuse("truth value")
    __hash__ = _refuse("hash")  # type: ignore[assignment]
    __index__ = _refuse("index")
    __int__ = _refuse("int()")
    __float__ = _refuse("float()")
    __str__ = _refuse("str()")
    __format__ = _refuse("format")
    __iter__ = _refuse("iteration")
    __len__ = _refuse("len()")
    __contains__ = _refuse("'in'")


class _LiftingTracer(LoraTracer):
    """A `LoraTracer` that reads the attributes `lifted` names, ``(module, attribute, target)``,
    as ``get_attr`` nodes of `target` (unused ones are dropped from the graph)."""

    def __init__(self, trace_through: set[int], hooks: TraceHooks, lifted: tuple) -> None:
        super().__init__(trace_through, hooks)
        self.lifted = lifted
        self._put: list[tuple[nn.Module, str, Any, LiftedValue]] = []

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        result = super().create_args_for_root(root_fn, is_module, concrete_args)
        for module, attr, target in self.lifted:
            value = module.__dict__[attr]
            proxy = LiftedValue(self.create_node("get_attr", target, (), {}), self, type(value))
            self._put.append((module, attr, value, proxy))
            module.__dict__[attr] = proxy
        return result

    def trace_call(self, root: nn.Module, call: Any) -> fx.Graph:
        try:
            graph = super().trace_call(root, call)
        finally:
            changed = [attr for module, attr, _, proxy in self._put if module.__dict__.get(attr) is not proxy]
            for module, attr, value, _ in self._put:
                module.__dict__[attr] = value
            self._put = []
        if changed:
            raise TraceFailure(f"forward changes the module's attribute {changed[0]!r}")
        targets = {target for _, _, target in self.lifted}
        for node in [n for n in graph.find_nodes(op="get_attr") if n.target in targets and not n.users]:
            graph.erase_node(node)
        return graph


# ------------------------------------------------------------------ comparing graphs
def _same_value(a: Any, b: Any, env: dict) -> bool:
    """`a` (of the lifted graph, its nodes mapped by `env`) is `b` (of the other graph)."""
    if isinstance(a, fx.Node):
        mapped = env.get(a, a)
        if isinstance(mapped, fx.Node):
            return mapped is b
        a = mapped[0]  # a lifted value, boxed
    if isinstance(b, fx.Node) or type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y, env) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_value(a[k], b[k], env) for k in a)
    if isinstance(a, slice):
        return all(_same_value(getattr(a, n), getattr(b, n), env) for n in ("start", "stop", "step"))
    if a is b:
        return True
    return isinstance(a, (bool, int, float, str, complex, torch.device)) and a == b


def same_graph(lifted: TracedVariant, other: TracedVariant, values: dict[str, Any]) -> bool:
    """`lifted`'s graph with each ``get_attr`` of a target in `values` replaced by that value is
    `other`'s graph, node for node (ops, targets, arguments; node names aside), for the same call
    pattern and inputs. Graphs with trace-time tensor constants are never called the same."""
    if lifted.key != other.key or lifted.inputs != other.inputs or lifted.constants or other.constants:
        return False
    env: dict[fx.Node, Any] = {}
    theirs = iter(other.graph.nodes)
    for node in lifted.graph.nodes:
        if node.op == "get_attr" and node.target in values:
            env[node] = (values[node.target],)
            continue
        match = next(theirs, None)
        if match is None or node.op != match.op:
            return False
        same_target = node.target is match.target or (isinstance(node.target, str) and node.target == match.target)
        if not same_target or not _same_value(node.args, match.args, env) or not _same_value(dict(node.kwargs), dict(match.kwargs), env):
            return False
        env[node] = match
    return next(theirs, None) is None


def _liftable(place: Place, value: Any) -> bool:
    """An int, float or str attribute whose name generated code writes as ``.name``."""
    return type(value) in _LIFTABLE and place[1].isidentifier() and not keyword.iskeyword(place[1])


# ------------------------------------------------------------------ the cache
@dataclass
class _Family:
    """Roots alike but for plain values: the first one's values and trace, and the lifted
    traces made so far (by the places they lift) or refused."""

    values: dict[Place, Any]
    variant: TracedVariant
    lifted: list[tuple[frozenset, TracedVariant]] = field(default_factory=list)
    refused: set[frozenset] = field(default_factory=set)
    #: the variants handed out for roots with the first one's values (its own and copies)
    handed: list[TracedVariant] = field(default_factory=list)

    def adopt(self, lifted: TracedVariant) -> None:
        """Give every root with the first one's values the lifted graph too (exact for them:
        `same_graph` held for those values), so that all the family builds one code."""
        self.variant = replace(self.variant)  # the first root's own graph stays the reference
        for variant in self.handed:
            variant.graph = lifted.graph


class TraceCache:
    """Traced variants (or trace failures) by fingerprint, for one pass over `model` (None: any
    roots; see the module docstring). A root whose class no other module of `model` has can match no other
    root (a fingerprint starts with the class): it is traced without one."""

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        self._model = model
        self._counted: Optional[Counter] = None  # classes of `model`'s modules, counted on first use
        self._entries: dict[Hashable, Union[TracedVariant, TraceFailure]] = {}
        self._families: dict[Hashable, _Family] = {}
        self._described: dict[int, tuple[nn.Module, set[int], Any]] = {}  # per root, for its other patterns
        #: module classes whose code needed ranks once: their rank-free trace is not tried again
        self._ranked_types: set[type] = set()

    def needs_ranks(self, cls: type) -> None:
        """Trace roots of `cls` with ranks at once (one needed them before: a rank-free attempt
        would fail again; a ranked graph is exact for its pattern either way)."""
        self._ranked_types.add(cls)

    def _count(self, cls: type) -> int:
        if self._counted is None:
            self._counted = Counter(type(m) for _, m in named_submodules(self._model))
        return self._counted[cls]

    def _trace_variant(self, root: nn.Module, trace_through: set[int], key: CallKey, **kwargs: Any) -> TracedVariant:
        """`trace_variant`, skipping the rank-free attempt for a class that needed ranks before
        (it would fail again: a graph for the ranked pattern is what it gives)."""
        variant = trace_variant(root, trace_through, key, rank_free_first=type(root) not in self._ranked_types, **kwargs)
        if key_is_ranked(variant.key):
            self._ranked_types.add(type(root))
        return variant

    def _describe(self, root: nn.Module, trace_through: set[int], key: CallKey) -> Optional[tuple[Hashable, dict[Place, Any]]]:
        known = self._described.get(id(root))
        if known is None or known[0] is not root or known[1] != trace_through:
            known = self._described[id(root)] = (root, set(trace_through), _describe_modules(root, trace_through))
        return None if known[2] is None else ((key, known[2][0]), known[2][1])

    def trace(self, root: nn.Module, trace_through: set[int], key: CallKey) -> TracedVariant:
        """`fxlora.tracing.traced.trace_variant`, or a copy of an identical root's trace made
        for `root` (same graph, inputs and constants; `root`'s own guards and inlined modules),
        or a lifted trace of its family (see the module docstring)."""
        if self._model is not None and self._count(type(root)) == 1:  # no identical root to share with
            return self._trace_variant(root, trace_through, key)
        described = self._describe(root, trace_through, key)
        if described is None:
            return self._trace_variant(root, trace_through, key)
        family_key, values = described
        full = (family_key, tuple(values.items()))
        entry = self._entries.get(full)
        if entry is not None:
            if isinstance(entry, TraceFailure):
                raise TraceFailure(str(entry))
            copied = _for_root(entry, root, trace_through)
            family = self._families.get(family_key)
            if family is not None and family.variant is entry:
                family.handed.append(copied)
            return copied
        family = self._families.get(family_key)
        if family is not None:
            lifted = self._lifted(family, values, root, trace_through, key)
            if lifted is not None:
                return lifted
        try:
            entry = self._trace_variant(root, trace_through, key)
        except TraceFailure as exc:
            self._entries[full] = exc
            raise
        self._entries[full] = entry
        if family_key not in self._families:
            self._families[family_key] = _Family(values, entry, handed=[entry])
        return entry

    def _lifted(self, family: _Family, values: dict[Place, Any], root: nn.Module, through: set[int], key: CallKey) -> Optional[TracedVariant]:
        """A trace of `root` that reads the values it does not share with the family's first
        root as graph nodes, if one is exact (module docstring); else None."""
        differing = frozenset(p for p, v in values.items() if type(v) is not type(family.values[p]) or v != family.values[p])
        for places, variant in family.lifted:
            if differing <= places:
                return _for_root(variant, root, through)
        if not differing or differing in family.refused or not all(_liftable(p, values[p]) for p in differing):
            return None
        targets = {p: f"{p[0]}.{p[1]}" if p[0] else p[1] for p in sorted(differing)}
        lift = tuple((root.get_submodule(p[0]), p[1], target) for p, target in targets.items())
        try:
            variant = self._trace_variant(root, through, key, tracer=functools.partial(_LiftingTracer, lifted=lift))
        except TraceFailure:
            variant = None
        if variant is None or not same_graph(variant, family.variant, {t: family.values[p] for p, t in targets.items()}):
            family.refused.add(differing)
            return None
        if not family.lifted:
            family.adopt(variant)
        family.lifted.append((differing, variant))
        return variant


def _for_root(entry: TracedVariant, root: nn.Module, trace_through: set[int]) -> TracedVariant:
    """`entry` (traced on a root alike) with `root`'s own guards and inlined-modules record."""
    traced = traced_modules(root, trace_through, entry.leaves)
    return TracedVariant(
        graph=entry.graph,
        inputs=entry.inputs,
        constants=entry.constants,
        key=entry.key,
        guards=make_guards(traced, hooks_for(root)),
        inlined=inlined(root, traced),
        leaves=entry.leaves,
        output_type=entry.output_type,
    )
