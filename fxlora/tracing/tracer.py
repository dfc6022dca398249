"""`LoraTracer`: the torch.fx tracer fxlora traces roots and branch templates with.

It traces through exactly the modules it is given (every other module is a leaf), remembers which
of them a failure came from (`LoraTracer.failed_in`), gives proxies
the information a call pattern fixes (`fxlora.tracing.proxies`), refuses gradient checkpointing
(a graph would silently drop it), records ``torch.tensor`` / ``torch.finfo`` of traced values as nodes
(`fxlora.tracing.constructors`), and lets every other thread through the process-wide patches
torch.fx makes while it traces (`fxlora.tracing.threads`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.boundary import boundary_of
from fxlora.tracing.constructors import proxy_aware_constructors
from fxlora.tracing.integrations import NO_HOOKS, TraceHooks
from fxlora.tracing.handles import ObjectProxy
from fxlora.tracing.proxies import InfoProxy, NotTraceable, TensorInfo, decide_comparison, infer
from fxlora.tracing.fx_module_patches import scoped_module_patches
from fxlora.tracing.fx_wrappers import reused_wrappers
from fxlora.tracing.threads import tracing_here, tracing_in_this_thread
from fxlora.tracing.submodules import submodule

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.tracing.call_template import CallTemplate

__all__ = ["CheckpointInTrace", "LoraTracer", "check_transparent"]

#: argument types torch.fx's ``Tracer.create_arg`` returns as they are
_PLAIN_ARGUMENTS = frozenset({int, float, bool, str, type(None)})


class CheckpointInTrace(NotTraceable):
    """The traced forward reached ``torch.utils.checkpoint``."""


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
        self._call: Optional[CallTemplate] = None
        self._self_node: Optional[fx.Node] = None
        #: after a failed trace: the innermost module traced through whose code the failure came
        #: from (None: the root's own code), see `fxlora.tracing.traced.trace_variant`
        self.failed_in: Optional[nn.Module] = None
        #: after a trace: the type (of `TraceHooks.output_types`) the call rebuilds from the graph's
        #: dict output, or None (the graph returns the output itself)
        self.output_type: Optional[type] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.trace_through

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InfoProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_function" and not kwargs:
            decided = decide_comparison(target, args)
            if decided is not None:  # a size compared where the sized pattern decides it: a Python bool
                return decided
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, InfoProxy) and kind in ("call_function", "call_method", "call_module"):
            module = submodule(self.root, target) if kind == "call_module" else None
            proxy.info = infer(kind, target, args, kwargs, module, self.hooks.rank_preserving)
        return proxy

    def create_arg(self, a: Any):
        if type(a) in _PLAIN_ARGUMENTS:  # what torch.fx's create_arg gives for them, without its type tests
            return a
        if isinstance(a, fx.Proxy):  # likewise (a proxy is never a parameter, a tensor or a module to torch.fx)
            return a.node
        if isinstance(a, nn.Module):
            if a is self.root and self._self_node is not None:
                return self._self_node
            path = self.submodule_paths.get(a) if self.submodule_paths else None
            if path:  # named by fx after the module path, never plain "self" (a child called `self`)
                return self.create_node("get_attr", path, (), {}, name="module_" + path.replace(".", "_"))
        return super().create_arg(a)

    def trace(self, root: Any, concrete_args: Optional[dict] = None) -> fx.Graph:
        with tracing_in_this_thread(), reused_wrappers(), scoped_module_patches(root):
            return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """torch.fx's, and a plain tensor in a parameter's slot (where ``torch.func.functional_call``
        puts its tensors for the call) read as that parameter, not baked in as a constant."""
        if not tracing_here():  # another thread's module, read while this one traces
            return attr_val
        read = super().getattr(attr, attr_val, parameter_proxy_cache)
        if read is attr_val and isinstance(attr_val, torch.Tensor):
            name = next((n for n, p in self.root.named_parameters(remove_duplicate=False) if p is attr_val), None)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return read

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if not tracing_here():  # another thread's call, made while this one traces
            return forward(*args, **kwargs)
        if _detached(self, m):  # built during the call (``ACT2FN[name](x)``): no node could name it
            return forward(*args, **kwargs)
        inlined = id(m) in self.trace_through and m is not self.root
        try:
            if inlined:
                check_transparent(type(m).forward, self.hooks, set(kwargs), m)
            result = super().call_module(m, forward, args, kwargs)
        except BaseException:
            if inlined and self.failed_in is None:  # the innermost module traced through
                self.failed_in = m
            raise
        self.failed_in = None  # a failure inside it that its code caught is none
        return result

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
                proxy.info = TensorInfo(slot.rank, slot.classes)
            proxies.append(proxy)
        fn = call.fn

        def entry(root: nn.Module, *values: Any) -> Any:
            args, kwargs = call.build(values)
            out = fn(root, *args, **kwargs)
            if isinstance(out, self.hooks.output_types) and type(out) is not dict:  # rebuilt by the call
                self.output_type = type(out)
                out = dict(out.items())
            return _plain_output(out)

        return entry, [self.root, *proxies]

    def trace_call(self, root: nn.Module, call: "CallTemplate") -> fx.Graph:
        """Trace ``call.fn(root, *args, **kwargs)`` for `call`'s pattern; the graph's placeholders
        are the root (`SELF`, removed when unused) and then ``call.slots`` in order."""
        self._call = call
        module = sys.modules.get(getattr(call.fn, "__module__", ""), None)
        if module is not None and module not in self._autowrap_search:
            self._autowrap_search = [*self._autowrap_search, module]
        try:
            with self.hooks.active(), _refusing_checkpoints(), proxy_aware_constructors():
                graph = self.trace(root)
        finally:
            self._call = None
        if self._self_node is not None and not self._self_node.users:
            graph.erase_node(self._self_node)
            self._self_node = None
        return graph


def _detached(tracer: LoraTracer, m: nn.Module) -> bool:
    """`m` is no submodule of the root (so a ``call_module`` node cannot name it), holds no
    tensors (nothing a graph would have to read from it) and adds nothing to its ``__call__``: its
    forward is traced inline, computing exactly what calling it computes."""
    if m is tracer.root or tracer.submodule_paths is None or m in tracer.submodule_paths:
        return False
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return False
    return boundary_of(m) is None and all(mod is not tracer.root for mod in m.modules())


def _plain_output(value: Any) -> Any:
    """`value`, if a graph can return it as it is: fx rebuilds containers as plain ``tuple`` /
    ``list`` / ``dict`` (named tuples kept), so a forward returning another subclass of them
    (transformers' ``ModelOutput``, a dict) would silently change type in a graph."""
    cls = type(value)
    if cls in (tuple, list) or (issubclass(cls, tuple) and hasattr(cls, "_fields")):
        for item in value:
            _plain_output(item)
    elif cls is dict:
        for item in value.values():
            _plain_output(item)
    elif issubclass(cls, (tuple, list, dict)):
        raise NotTraceable(f"forward returns a {cls.__name__}, which a graph would return as a plain {cls.__mro__[-2].__name__}")
    return value


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


def check_transparent(fn: Callable, hooks: TraceHooks, keywords: set[str], module: Optional[nn.Module] = None) -> Callable:
    """`fn` (the forward of `module`) seen through decorators an integration declares transparent
    for a call with these keyword arguments; raises for any other decorator (it could act
    differently on the real call than on the traced one, e.g. transformers'
    gradient-checkpointing wrapper)."""
    while hasattr(fn, "__wrapped__"):
        step = hooks.unwrap(fn, module)
        if step is None:
            code = getattr(fn, "__code__", None)
            where = getattr(code, "co_qualname", None) or getattr(fn, "__qualname__", repr(fn))
            raise NotTraceable(f"forward is wrapped by {where}, which fxlora does not know to be transparent")
        fn, acting = step
        if keywords & acting:
            raise NotTraceable(f"the call passes {sorted(keywords & acting)}, which forward's decorator rewrites")
    return fn
