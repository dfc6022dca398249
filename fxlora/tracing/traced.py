"""Symbolic tracing for fxlora: which modules become graphs, and how one call pattern is traced.

A *graph root* is a module whose ``forward`` fxlora replaces by rewritten graph code. Inside a
root, only the ancestors of adapted modules are traced through; everything else (adapted layers,
`modules_to_save` modules and every module without an adapted layer inside) stays a leaf, one
``call_module`` node, so tracing costs little and touches little.

A traced graph is specialised to one *call pattern*: the root's ``training`` flag plus, per
argument, its *kind*: a tensor (a placeholder; optionally of a fixed rank), a concrete Python
value (``None``, a bool, an int, a float or a str, baked in), a tuple or list of such, or a
registered handle object of a given type (`fxlora.tracing.integrations.register_object_type`, e.g. a
transformers ``Cache``: a placeholder too). `call_key` computes the pattern of a call; the runtime
keeps one graph per pattern seen, so a branch on ``mask is None`` or ``self.training`` is always
taken the way the call in hand takes it. A call with any other kind of argument runs the original
forward eagerly.

*Ranked* patterns also fix each tensor argument's rank, so that code such as
``x.view(*x.shape[:-1], h, d)`` traces (`fxlora.tracing.proxies` derives what follows from the ranks); a
root only uses ranked patterns when its plain trace fails.

The function traced is the class's ``forward``, seen through decorators an integration declares
transparent for the call in hand (`fxlora.tracing.integrations.TraceHooks.unwrap`); the call is replayed
as given (defaults apply as in Python), so ``*args``/``**kwargs`` parameters work.

Tracing never changes the model: training flags are restored, and a forward that would change a
traced module's attributes fails to trace (its graph could not reproduce that change). Plain
attribute values the trace read (flags such as ``gradient_checkpointing``) are recorded as
*guards*: when one changes, the pattern is traced again (`guards_hold`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.tracing.integrations import NO_HOOKS, TraceHooks, hooks_for, object_kind, object_kind_of_type
from fxlora.tracing.proxies import InfoProxy, NotTraceable, ObjectProxy, TensorInfo, _length, infer
from fxlora.tracing.threads import tracing_here, tracing_in_this_thread

__all__ = [
    "TraceFailure",
    "TracedVariant",
    "LoraTracer",
    "call_key",
    "canonical_key",
    "key_is_ranked",
    "erase_ranks",
    "trace_variant",
    "trace_through_ids",
    "gather_inputs",
    "guards_hold",
    "short_error",
    "adopt_constants",
    "CONSTANT_PREFIX",
    "SELF",
]

TENSOR = "T"
OBJECT = "obj"
CallKey = tuple  # (training, positional kinds, sorted (name, kind) pairs)
Source = Union[int, str, tuple]
#: input source meaning "the root module itself" (passed to opaque functions that take it)
SELF: tuple = ("<root module>",)
_MAX_ITEMS = 16


class TraceFailure(Exception):
    """A module (or one call pattern of it) cannot be captured as a graph."""


class CheckpointInTrace(NotTraceable):
    """The traced forward reached ``torch.utils.checkpoint``."""


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
    constants: dict = None  # trace-time tensor constants the graph reads (see `adopt_constants`)
    key: Optional[CallKey] = None
    guards: tuple = ()


class LoraTracer(fx.Tracer):
    """Traces through exactly the modules in `trace_through` (by id); every other module is a leaf.

    Proxies carry what the call pattern fixes (`fxlora.tracing.proxies`); `hooks` add a library's leaf
    functions, rank-preserving module types and patches. `trace_call` traces one call pattern.
    """

    def __init__(self, trace_through: set[int], hooks: TraceHooks = NO_HOOKS) -> None:
        super().__init__(autowrap_functions=tuple(f for f in hooks.leaf_functions if callable(f)))
        self.trace_through = trace_through
        self.hooks = hooks
        # Reading a buffer gives a graph node, not its current value baked in as a constant.
        self.proxy_buffer_attributes = True
        self._call: Optional[_CallTemplate] = None
        self._self_node: Optional[fx.Node] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.trace_through

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InfoProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, InfoProxy) and kind in ("call_function", "call_method", "call_module"):
            module = self.root.get_submodule(target) if kind == "call_module" else None
            proxy.info = infer(kind, target, args, kwargs, module, self.hooks.rank_preserving)
        return proxy

    def iter(self, obj: fx.Proxy):
        length = _length(getattr(obj, "info", None))
        if length is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(length)])

    def create_arg(self, a: Any):
        if isinstance(a, nn.Module) and not isinstance(a, fx.Proxy):
            if a is self.root and self._self_node is not None:
                return self._self_node
            path = self.submodule_paths.get(a) if self.submodule_paths else None
            if path:  # named by fx after the module path, never plain "self" (a child called `self`)
                return self.create_node("get_attr", path, (), {}, name="module_" + path.replace(".", "_"))
        return super().create_arg(a)

    def trace(self, root: Any, concrete_args: Optional[dict] = None) -> fx.Graph:
        with tracing_in_this_thread():
            return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if not tracing_here():  # another thread's module, read while this one traces
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if not tracing_here():  # another thread's call, made while this one traces
            return forward(*args, **kwargs)
        if id(m) in self.trace_through and m is not self.root:
            _check_transparent(type(m).forward, self.hooks, set(kwargs))
        return super().call_module(m, forward, args, kwargs)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        call = self._call
        if call is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        self._self_node = self.create_proxy("placeholder", "fxlora_root", (), {}).node
        proxies = []
        for slot in call.slots:
            proxy = self.create_proxy("placeholder", slot.name, (), {})
            if slot.object is not None:
                proxy = ObjectProxy(proxy.node, self, slot.cls, slot.object, slot.members)
            elif slot.rank is not None:
                proxy.info = TensorInfo(slot.rank)
            proxies.append(proxy)
        fn = call.fn

        def entry(root: nn.Module, *values: Any) -> Any:
            args, kwargs = call.build(values)
            return fn(root, *args, **kwargs)

        return entry, [self.root, *proxies]

    def trace_call(self, root: nn.Module, call: "_CallTemplate") -> fx.Graph:
        """Trace ``call.fn(root, *args, **kwargs)`` for `call`'s pattern; the graph's placeholders
        are the root (`SELF`, removed when unused) and then ``call.slots`` in order."""
        self._call = call
        module = sys.modules.get(getattr(call.fn, "__module__", ""), None)
        if module is not None and module not in self._autowrap_search:
            self._autowrap_search = [*self._autowrap_search, module]
        try:
            with self.hooks.active(), _refusing_checkpoints():
                graph = self.trace(root)
        finally:
            self._call = None
        if self._self_node is not None and not self._self_node.users:
            graph.erase_node(self._self_node)
            self._self_node = None
        return graph


_CHECKPOINT_ENTRIES = ("_checkpoint_impl", "CheckpointFunction", "_checkpoint_without_reentrant_generator")


@contextlib.contextmanager
def _refusing_checkpoints():
    """While tracing, ``torch.utils.checkpoint`` raises: fx would record the checkpointed
    function's operations inline and silently drop the checkpointing (the memory saving the
    user asked for). The module then runs eagerly, checkpointing intact."""
    import torch.utils.checkpoint as checkpoint

    saved = {name: checkpoint.__dict__[name] for name in _CHECKPOINT_ENTRIES if name in checkpoint.__dict__}

    def refusing(original: Callable) -> Callable:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            if not tracing_here():  # another thread checkpoints while this one traces
                return original(*args, **kwargs)
            raise CheckpointInTrace("the forward uses gradient checkpointing (torch.utils.checkpoint), which a graph would drop")

        return refuse

    def refused_class(original: type) -> type:
        return type(original.__name__, (), {"apply": staticmethod(refusing(original.apply))})

    try:
        for name, value in saved.items():
            setattr(checkpoint, name, refused_class(value) if isinstance(value, type) else refusing(value))
        yield
    finally:
        for name, value in saved.items():
            setattr(checkpoint, name, value)


# ------------------------------------------------------------------ call patterns
def _kind(value: Any, ranked: bool) -> Optional[Hashable]:
    if isinstance(value, torch.Tensor):
        return (TENSOR, value.dim()) if ranked else TENSOR
    if value is None or isinstance(value, (bool, int, str)):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", value) if value == value else None
    if type(value) in (tuple, list) and len(value) <= _MAX_ITEMS:
        items = tuple(_kind(v, ranked) for v in value)
        return None if None in items else (type(value).__name__, items)
    kind = object_kind(value)
    if kind is not None:
        return (OBJECT, type(value), kind.member_types(value))
    return None


def call_key(training: bool, args: tuple, kwargs: dict, ranked: bool = False) -> Optional[CallKey]:
    """The call pattern of ``forward(*args, **kwargs)``, or None when an argument is of no
    supported kind (such calls are not traced). With `ranked`, tensor kinds include the rank."""
    kinds = []
    for a in args:
        k = _kind(a, ranked)
        if k is None:
            return None
        kinds.append(k)
    named = []
    for name in sorted(kwargs):
        k = _kind(kwargs[name], ranked)
        if k is None:
            return None
        named.append((name, k))
    return (training, tuple(kinds), tuple(named))


def _map_kinds(key: CallKey, fn: Callable[[Any], Any]) -> CallKey:
    def walk(kind: Any) -> Any:
        if type(kind) is tuple and kind and kind[0] in ("tuple", "list"):
            return (kind[0], tuple(walk(k) for k in kind[1]))
        return fn(kind)

    training, positional, named = key
    return (training, tuple(walk(k) for k in positional), tuple((n, walk(k)) for n, k in named))


def _is_ranked_tensor(kind: Any) -> bool:
    return type(kind) is tuple and len(kind) == 2 and kind[0] == TENSOR


def key_is_ranked(key: CallKey) -> bool:
    """True when `key` fixes the rank of some tensor argument."""
    found = []
    _map_kinds(key, lambda k: found.append(_is_ranked_tensor(k)) or k)
    return any(found)


def erase_ranks(key: CallKey) -> CallKey:
    """`key` with every tensor's rank forgotten."""
    return _map_kinds(key, lambda k: TENSOR if _is_ranked_tensor(k) else k)


def with_training(key: CallKey, training: bool) -> CallKey:
    return (training, *key[1:])


def gather_inputs(sources: tuple[Source, ...], root: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The values of a variant's placeholders for the call ``(args, kwargs)`` (see `TracedVariant`)."""
    values = []
    for src in sources:
        kind = type(src)
        if kind is int:
            values.append(args[src])
        elif kind is str:
            values.append(kwargs[src])
        elif src == SELF:
            values.append(root)
        else:
            head = src[0]
            value = args[head] if type(head) is int else kwargs[head]
            for i in src[1:]:
                value = value[i]
            values.append(value)
    return values


def guards_hold(guards: tuple) -> bool:
    """True while every guard ``(object, names, reader, values)`` still reads its values.

    Eagerly one C-level ``attrgetter`` call per guarded object; under ``torch.compile`` plain
    ``getattr`` (which dynamo traces, turning each value into one of its own guards)."""
    try:
        if torch.compiler.is_compiling():
            return all(tuple(getattr(obj, n) for n in names) == values for obj, names, _, values in guards)
        for obj, names, read, values in guards:
            got = read(obj)
            if (got if len(names) > 1 else (got,)) != values:
                return False
    except AttributeError:  # an attribute was deleted
        return False
    return True


_MISSING = object()


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


@dataclass
class _Slot:
    """One placeholder of a call template: a tensor or a handle object inside the call."""

    source: Source
    name: str
    rank: Optional[int] = None
    cls: Optional[type] = None
    object: Any = None  # the registered ObjectKind of `cls`
    members: dict = field(default_factory=dict)  # member name -> type, for handles


class _CallTemplate:
    """A call pattern made concrete for tracing: constants are values, tensors and handles are
    `_Slot`s that become placeholders (`build` puts the proxies in)."""

    def __init__(self, fn: Callable, key: CallKey) -> None:
        self.fn = fn
        self.slots: list[_Slot] = []
        _, pos_kinds, named_kinds = key
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1:]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        by_name = {p.name: p for p in params}
        takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        for name, _ in named_kinds:
            p = by_name.get(name)
            if (p is None and not takes_any_keyword) or (p is not None and p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD)):
                raise TraceFailure(f"keyword argument {name!r} is not a named parameter of forward")
        self._taken: set[str] = {"fxlora_root"}
        self.args = [
            self._template(k, i, positional[i] if i < len(positional) else f"arg{i}") for i, k in enumerate(pos_kinds)
        ]
        self.kwargs = {n: self._template(k, n, n) for n, k in named_kinds}
        try:
            sig.bind(None, *self.args, **self.kwargs)
        except TypeError as exc:
            raise TraceFailure(f"forward() cannot take this call: {exc}") from None

    def _name(self, wanted: str) -> str:
        name = wanted if wanted.isidentifier() else "input"
        base, i = name, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def _template(self, kind: Any, source: Source, name: str) -> Any:
        if kind == TENSOR or _is_ranked_tensor(kind):
            slot = _Slot(source, self._name(name), rank=kind[1] if kind != TENSOR else None)
        elif type(kind) is tuple and kind[0] == OBJECT:
            slot = _Slot(source, self._name(name), cls=kind[1], object=object_kind_of_type(kind[1]), members=dict(kind[2]))
            if slot.object is None:
                raise TraceFailure(f"{kind[1].__name__} arguments are not traced (no integration declares them)")
        elif type(kind) is tuple and kind[0] in ("tuple", "list"):
            head = source if type(source) is tuple else (source,)
            items = [self._template(k, (*head, i), f"{name}_{i}") for i, k in enumerate(kind[1])]
            return tuple(items) if kind[0] == "tuple" else items
        else:
            return kind[1]  # a constant
        self.slots.append(slot)
        return slot

    def build(self, values: tuple) -> tuple[list, dict]:
        """The call's ``(args, kwargs)`` with the slots' values (proxies while tracing) in place."""
        by_slot = {id(slot): v for slot, v in zip(self.slots, values)}

        def fill(t: Any) -> Any:
            if isinstance(t, _Slot):
                return by_slot[id(t)]
            if type(t) in (tuple, list):
                return type(t)(fill(x) for x in t)
            return t

        return [fill(a) for a in self.args], {n: fill(v) for n, v in self.kwargs.items()}


def _check_transparent(fn: Callable, hooks: TraceHooks, keywords: set[str]) -> Callable:
    """`fn` seen through decorators an integration declares transparent for a call with these
    keyword arguments; raises for any other decorator (it could act differently on the real call
    than on the traced one, e.g. transformers' gradient-checkpointing wrapper)."""
    while hasattr(fn, "__wrapped__"):
        step = hooks.unwrap(fn)
        if step is None:
            code = getattr(fn, "__code__", None)
            where = getattr(code, "co_qualname", None) or getattr(fn, "__qualname__", repr(fn))
            raise NotTraceable(f"forward is wrapped by {where}, which fxlora does not know to be transparent")
        fn, acting = step
        if keywords & acting:
            raise NotTraceable(f"the call passes {sorted(keywords & acting)}, which forward's decorator rewrites")
    return fn


def _forward_function(root: nn.Module, hooks: TraceHooks, key: CallKey) -> Callable:
    """The class's ``forward`` seen through decorators an integration declares transparent for
    this call; a forward wrapped by anything else is not traced."""
    try:
        fn = _check_transparent(type(root).forward, hooks, {name for name, _ in key[2]})
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


_PLAIN = (bool, int, float, str, type(None))
#: plain attributes torch and transformers keep on modules for their own bookkeeping
_NOT_GUARDED = frozenset({"training", "_is_full_backward_hook", "_is_hf_initialized"})


def _guards(traced_modules: list[nn.Module], hooks: TraceHooks) -> tuple:
    """Guards ``(object, names, reader, values)``: every plain attribute of the
    traced-through modules (their values are baked into the graph wherever forward reads them),
    and the attributes the integrations name. One guard per object, so checking costs one C call
    per traced module."""
    names: dict[int, tuple[Any, list[str]]] = {}
    for module in traced_modules:
        plain = [
            name
            for name, value in module.__dict__.items()
            if name not in _NOT_GUARDED and type(value) in _PLAIN and not (type(value) is float and math.isnan(value))
        ]
        names.setdefault(id(module), (module, []))[1].extend(plain)
        for obj, name in hooks.guards(module):
            if hasattr(obj, name):
                entry = names.setdefault(id(obj), (obj, []))[1]
                if name not in entry:
                    entry.append(name)
    guards = []
    for obj, attrs in names.values():
        if attrs:
            read = operator.attrgetter(*attrs) if isinstance(obj, nn.Module) else _RawAttributes(tuple(attrs))
            guards.append((obj, tuple(attrs), read, tuple(getattr(obj, n) for n in attrs)))
    return tuple(guards)


class _RawAttributes:
    """Reads attributes with ``object.__getattribute__`` (descriptors and properties included),
    skipping a class's own ``__getattribute__`` override (transformers configs have a slow one)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __call__(self, obj: Any) -> Any:
        if len(self.names) == 1:  # like operator.attrgetter
            return object.__getattribute__(obj, self.names[0])
        return tuple(object.__getattribute__(obj, n) for n in self.names)


def trace_variant(
    root: nn.Module,
    trace_through: set[int],
    key: CallKey,
) -> TracedVariant:
    """Trace `root`'s ``forward`` for the call pattern `key`; raise `TraceFailure` if it cannot be
    captured. A ranked `key` is first traced without ranks (the result then holds for any rank,
    ``variant.key`` says so).

    Guarantees: the returned graph's placeholders are the pattern's tensors and handles (and the
    root itself where an opaque function takes it), sourced by ``variant.inputs``; the model is
    left as it was (flags and attributes).

    A forward that uses gradient checkpointing cannot be one graph (the graph would drop the
    checkpointing): that is a `TraceFailure`. While planning, fxlora then plans inside such a
    module; afterwards (a root switched checkpointing on after ``transform``, e.g. timm's
    ``set_grad_checkpointing()``) that call pattern runs the original forward, whose adapted layers
    compute their branches eagerly (and take part in checkpoint recomputation).
    """
    if key_is_ranked(key):
        try:
            return _trace(root, trace_through, erase_ranks(key))
        except TraceFailure:
            pass
    return _trace(root, trace_through, key)


def _trace(root: nn.Module, trace_through: set[int], key: CallKey) -> TracedVariant:
    training, _, _ = key
    hooks = hooks_for(root)
    call = _CallTemplate(_forward_function(root, hooks, key), key)
    flags = [(m, m.training) for m in root.modules()]
    traced_modules = [m for m in root.modules() if id(m) in trace_through]
    snapshot = _snapshot(traced_modules)
    graph: Optional[fx.Graph] = None
    tracer = LoraTracer(trace_through, hooks)
    try:
        root.train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace_call(root, call)
    except TraceFailure:
        raise
    except CheckpointInTrace as exc:
        raise TraceFailure(short_error(exc)) from exc
    except Exception as exc:  # any failure of symbolic execution means "not traceable"
        raise TraceFailure(short_error(exc) + _where(exc)) from exc
    finally:
        for module, flag in flags:
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
    return TracedVariant(graph=graph, inputs=inputs, constants=constants, key=key, guards=_guards(traced_modules, hooks))


def modules_called(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.find_nodes(op="call_module"):
        counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def attributes_read(graph: fx.Graph) -> set[str]:
    return {node.target for node in graph.find_nodes(op="get_attr")}

