"""What model libraries contribute to tracing: the hooks of one library, found from a model's classes.

fxlora traces any ``nn.Module`` with plain torch.fx rules (`fxlora.tracing.traced`). Some libraries need a
little more knowledge to be traced *correctly* and *further*; an integration module states it as a
`TraceHooks` value:

- ``leaf_functions``: functions kept opaque (one ``call_function`` node), e.g. timm's registered
  "notrace" helpers, which branch on shapes;
- ``rank_preserving``: leaf module types whose output has the rank of their input (lets
  ``(*x.shape[:-1], -1, d)`` be traced after such a module, see `fxlora.tracing.proxies`);
- ``unwrap``: recognises decorators around ``forward`` that are transparent for a given call
  (transformers' ``deprecate_kwarg``) and names the keyword arguments that make them act;
- ``patches``: context managers active while tracing (transformers: the attention-function lookup
  returns an opaque leaf);
- ``guards``: extra ``(object, attribute)`` pairs whose trace-time values a graph depends on
  (transformers: ``config._attn_implementation``);
- ``example_inputs``: small inputs ``(args, kwargs)`` for forward passes, used to observe how each
  module is really called (`fxlora.tracing.probe`);
- ``pure_in_eval``: tests for leaf modules that, in evaluation mode, compute their output from
  their input and their own tensors alone (timm's norm layers, transformers' activation
  modules), so that compiled code may run them inside ``torch.cond`` (`fxlora.runtime.idle`).

Object arguments that are neither tensors nor constants can be declared as *handles*
(`register_object_type`): such an argument becomes a placeholder whose type is part of the call
pattern and on which only the declared attributes may be used (transformers' ``Cache``: ``update``).

Integrations are looked up by the top-level package of a model's module classes, or of the classes
they derive from (a model class of the user's own or of ``trust_remote_code`` code deriving from
transformers' ``PreTrainedModel`` gets transformers' hooks, its example inputs included), and
imported only then, so fxlora never imports timm or transformers for a model that does not use them.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch.nn as nn

from fxlora.tracing.memo import FixedAnswers

__all__ = [
    "TraceHooks",
    "ObjectKind",
    "Flags",
    "hooks_for",
    "hooks_fixed",
    "register_object_type",
    "object_kind",
    "object_kind_of_type",
    "opaque",
    "NO_HOOKS",
    "INTEGRATIONS",
    "MARKERS",
]

#: top-level package of a module class -> fxlora integration module
INTEGRATIONS: dict[str, str] = {
    "diffusers": "fxlora.tracing.integrations.diffusers",
    "timm": "fxlora.tracing.integrations.timm",
    "transformers": "fxlora.tracing.integrations.transformers",
    "kernels": "fxlora.tracing.integrations.hf_kernels",
}

#: an instance attribute a library's class decorator gives modules of any package -> that library
#: (the ``kernels`` package's ``use_kernelized_func``, which transformers 5 applies too)
MARKERS: dict[str, str] = {"_kernel_funcs": "kernels"}

#: ``(forward, its module) -> (wrapped function, keyword names that make the wrapper act)`` or None
Unwrapper = Callable[[Callable, Optional[nn.Module]], Optional[tuple[Callable, frozenset[str]]]]


@dataclass(frozen=True)
class TraceHooks:
    """Tracing knowledge of one library (or the merge of several)."""

    leaf_functions: tuple[Callable, ...] = ()
    rank_preserving: tuple[type, ...] = ()
    unwrappers: tuple[Unwrapper, ...] = ()
    patches: tuple[Callable[[], ContextManager], ...] = ()
    guard_sources: tuple[Callable[[nn.Module], list[tuple[Any, str]]], ...] = ()
    example_inputs: Optional[Callable[[nn.Module], list[tuple[tuple, dict[str, Any]]]]] = None
    #: output container types a graph returns as a dict of their items and the call rebuilds
    #: (transformers' ``ModelOutput``): ``type(**items)`` must equal the original
    output_types: tuple[type, ...] = ()
    #: modules no graph traces through, each a graph root of its own whose graph calls its
    #: children holding adapted layers as modules, roots themselves (transformers'
    #: ``GradientCheckpointingLayer``: checkpointing it must keep wrapping those children's graphs)
    kept_whole: tuple[Callable[[nn.Module], bool], ...] = ()
    #: leaf modules that compute purely in evaluation mode (see the module docstring)
    pure_in_eval: tuple[Callable[[nn.Module], bool], ...] = ()
    #: ``(name, summary)``: an instance attribute of a module traced through that its graph never
    #: reads, but whose state decides whether the module traces (a transparent wrapper's own
    #: state: ``kernels``' private function copies). The fingerprint that decides which blocks
    #: share a trace (`fxlora.tracing.reuse`) holds ``summary(value)`` for it, not its identity
    attribute_summaries: tuple[tuple[str, Callable[[Any], Any]], ...] = ()

    def merged(self, other: "TraceHooks") -> "TraceHooks":
        return TraceHooks(
            leaf_functions=self.leaf_functions + other.leaf_functions,
            rank_preserving=self.rank_preserving + other.rank_preserving,
            unwrappers=self.unwrappers + other.unwrappers,
            patches=self.patches + other.patches,
            guard_sources=self.guard_sources + other.guard_sources,
            example_inputs=self.example_inputs or other.example_inputs,
            attribute_summaries=self.attribute_summaries + other.attribute_summaries,
            output_types=self.output_types + other.output_types,
            kept_whole=self.kept_whole + other.kept_whole,
            pure_in_eval=self.pure_in_eval + other.pure_in_eval,
        )

    def keeps_whole(self, module: nn.Module) -> bool:
        """`module` is one of `kept_whole`."""
        return any(test(module) for test in self.kept_whole)

    def computes_purely(self, module: nn.Module) -> bool:
        """`module` is one of `pure_in_eval`."""
        return any(test(module) for test in self.pure_in_eval)

    def unwrap(self, fn: Callable, module: Optional[nn.Module] = None) -> Optional[tuple[Callable, frozenset[str]]]:
        """``(wrapped function, keyword names that make the wrapper act)`` when some integration
        knows `fn` (the forward of `module`) to be a transparent wrapper, else None."""
        for unwrapper in self.unwrappers:
            step = unwrapper(fn, module)
            if step is not None:
                return step
        return None

    def guards(self, module: nn.Module) -> list[tuple[Any, str]]:
        return [g for source in self.guard_sources for g in source(module)]

    @contextlib.contextmanager
    def active(self):
        """All `patches` applied (restored on exit, even on error)."""
        with contextlib.ExitStack() as stack:
            for patch in self.patches:
                stack.enter_context(patch())
            yield


NO_HOOKS = TraceHooks()
_loaded: dict[str, TraceHooks] = {}
_merged: dict[frozenset[str], TraceHooks] = {}


def _library_hooks(package: str) -> TraceHooks:
    if package not in _loaded:
        module = importlib.import_module(INTEGRATIONS[package])
        _loaded[package] = module.trace_hooks()
    return _loaded[package]


_CLASS_LIBRARIES: "weakref.WeakKeyDictionary[type, frozenset[str]]" = weakref.WeakKeyDictionary()


def _class_libraries(cls: type) -> frozenset[str]:
    """The integrated packages of `cls` and of the classes it derives from."""
    found = _CLASS_LIBRARIES.get(cls)
    if found is None:
        found = _CLASS_LIBRARIES[cls] = frozenset(p for p in (c.__module__.partition(".")[0] for c in cls.__mro__) if p in INTEGRATIONS)
    return found


def libraries_of(modules: Iterable[nn.Module]) -> frozenset[str]:
    """Packages with an integration among the classes of `modules`, and libraries whose
    decorators marked one of them (`MARKERS`)."""
    found: set[str] = set()
    for m in modules:
        found.update(_class_libraries(type(m)))
        found.update(library for marker, library in MARKERS.items() if marker in m.__dict__)
    return frozenset(found)


_HOOKS = FixedAnswers()


def hooks_fixed() -> ContextManager[None]:
    """While entered, `hooks_for` on this thread looks at each module's tree once (a walk of the
    whole tree per question: planning asks about a model's roots hundreds of times). For a pass
    that gives no module a child of another integrated library than its tree has (planning and
    installing an adapter: adapter modules are torch's and fxlora's, `modules_to_save` copies of
    modules already there)."""
    return _HOOKS.fixed()


def hooks_for(module: nn.Module) -> TraceHooks:
    """The merged hooks of every library whose classes appear in `module` (imports those
    integrations on first use)."""
    return _HOOKS.answer((module,), lambda: _merged_hooks(libraries_of(module.modules())))


def _merged_hooks(packages: frozenset[str]) -> TraceHooks:
    if packages not in _merged:
        hooks = NO_HOOKS
        for package in sorted(packages):
            hooks = hooks.merged(_library_hooks(package))
        _merged[packages] = hooks
    return _merged[packages]


# ---------------------------------------------------------------------- object handles
@dataclass(frozen=True)
class ObjectKind:
    """An object type that may be passed to a traced forward as an opaque handle.

    ``attributes`` may be read or called on a handle in traced code (each use is a node run on the
    real object); ``members`` are attributes that are handles themselves, whose types join the
    call pattern (so ``isinstance`` checks on them are exact too).
    """

    base: type
    attributes: frozenset[str] = field(default_factory=frozenset)
    members: frozenset[str] = field(default_factory=frozenset)
    #: more attributes for particular handle and member types: ``(cls, {member: type}) -> names``
    extra: Optional[Callable[[type, dict], Iterable[str]]] = None
    #: attributes holding a dict of plain flags whose contents join the call pattern (`Flags`)
    flags: frozenset[str] = field(default_factory=frozenset)
    #: methods that leave those flags as they are (traced code may call them between reads)
    flag_safe: frozenset[str] = field(default_factory=frozenset)
    #: members whose truth value joins the call pattern (``if cache:`` on them is exact)
    truth_members: frozenset[str] = field(default_factory=frozenset)

    def allowed(self, cls: type, members: dict) -> frozenset[str]:
        """Attributes traced code may use on a handle of type `cls` with these member types."""
        return self.attributes | frozenset(self.extra(cls, members) if self.extra else ())

    def member_types(self, value: Any) -> tuple[tuple[str, Any], ...]:
        """``(name, type)`` of each handle member of `value`, and ``(name, Flags)`` of each of
        its flag dicts (the part of a handle's state that joins the call pattern)."""
        found: list[tuple[str, Any]] = []
        for name in sorted(self.members):
            member = getattr(value, name, None)
            if member is not None and object_kind(member) is not None:
                found.append((name, type(member)))
        for name in sorted(self.truth_members):
            member = getattr(value, name, None)
            if member is not None and object_kind(member) is not None:
                found.append((f"{name}.__bool__", Flags(bool(member))))
        for name in sorted(self.flags):
            table = getattr(value, name, None)
            if type(table) is dict and all(type(v) in (bool, int, type(None)) for v in table.values()):
                try:
                    found.append((name, Flags(tuple(sorted(table.items())))))
                except TypeError:  # keys that do not sort: not a pattern
                    pass
        return tuple(found)


@dataclass(frozen=True)
class Flags:
    """The contents of a handle's flag dict (``EncoderDecoderCache.is_updated``: sorted items), or
    the truth value of a member, at a call: part of the call pattern, so traced code reads them as
    constants (`fxlora.tracing.proxies.TracedFlags`) and a call with others is another pattern."""

    items: Any


_object_kinds: list[ObjectKind] = []
_kind_of_type: dict[type, Optional[ObjectKind]] = {}


def register_object_type(
    base: type,
    attributes: Iterable[str],
    members: Iterable[str] = (),
    extra: Optional[Callable[[type, dict], Iterable[str]]] = None,
    flags: Iterable[str] = (),
    flag_safe: Iterable[str] = (),
    truth_members: Iterable[str] = (),
) -> None:
    """Let instances of `base` (and subclasses) be call arguments of traced forwards; in the
    traced code only `attributes` and `members` of them may be used, plus what `extra` allows for
    a handle's exact type (anything else makes the trace fail, so the call runs eagerly), and
    the dicts of plain flags named in `flags` (read as constants of the pattern, written as nodes;
    the methods `flag_safe` names leave them unchanged), and the truth values of the members named
    in `truth_members`.
    Registering the same type again replaces its entry."""
    _object_kinds[:] = [k for k in _object_kinds if k.base is not base]
    _object_kinds.append(ObjectKind(base, frozenset(attributes), frozenset(members), extra, frozenset(flags), frozenset(flag_safe), frozenset(truth_members)))
    _kind_of_type.clear()


def object_kind(value: Any) -> Optional[ObjectKind]:
    """The registered kind of `value`'s type, or None."""
    return object_kind_of_type(type(value))


def object_kind_of_type(cls: type) -> Optional[ObjectKind]:
    """The registered kind of instances of `cls`, or None."""
    try:
        return _kind_of_type[cls]
    except KeyError:
        kind = next((k for k in _object_kinds if issubclass(cls, k.base)), None)
        _kind_of_type[cls] = kind
        return kind


# ---------------------------------------------------------------------- opaque functions
def opaque(fn: Callable, info: Any = None) -> Callable:
    """`fn` as a tracing leaf: called with traced values, it records one ``call_function`` node
    whose target is `fn` itself (so the graph calls the very same function at run time) and
    returns a proxy carrying `info` (`fxlora.tracing.proxies`; a callable `info` is given the
    call's ``args, kwargs`` and returns it); called with concrete values, it is `fn`."""
    import functools

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        tracer = tracer_of((args, kwargs))
        if tracer is None:
            return fn(*args, **kwargs)
        proxy = tracer.create_proxy("call_function", fn, args, kwargs)
        proxy.info = info(args, kwargs) if callable(info) else info
        return proxy

    return call


def tracer_of(values: Any) -> Any:
    """The tracer of the first traced value (`torch.fx.Proxy`) in `values` (any nesting), or None."""
    import torch.fx as fx
    from torch.utils import _pytree as pytree

    return next((a.tracer for a in pytree.tree_leaves(values) if isinstance(a, fx.Proxy)), None)
