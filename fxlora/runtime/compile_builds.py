"""Gated code built when ``torch.compile`` first needs it, not at transform.

A graph root runs two kinds of code (`fxlora.runtime.forwards.GraphForward`): eager code per
adapter state, built on the first eager call in that state, and *gated* code, the one code per
call pattern that ``torch.compile`` captures (adapter states become tensor gates, so switching
never recompiles). Eager calls never run gated code, so building it at transform (and again at
every mode switch) is work a model used eagerly never needs: on a tiny llama it is about a
quarter of ``transform``. The same holds for the call patterns planning saw but did not trace
(`fxlora.planning.roots.trace_root`: a root's patterns beyond its first, ``GraphForward.pending``):
they are traced here too, before the gated code is built.

So a root whose gated code is due registers here (`defer`), and its code is built when dynamo
starts compiling any frame (its compile-start callback, before the frame is traced: the code is
there when dynamo reads it, so the compiled model meets no missing code, breaks no graph and
recompiles no more than before). The build takes `fxlora.runtime.calls.CALL_LOCK` only if no
other thread holds it: dynamo calls back holding its own compile lock, and waiting there for a
forward in another thread, which may itself wait for that lock, could deadlock. A root whose
build was skipped so, or any code torch.compile does not compile (``torch.export`` without
dynamo), builds on first use (`GraphForward._slow_call`): the results are the same either way.

Where this torch has no compile-start callback, `defer` declines and the code is built at once,
as before.

A call pattern nobody saw before torch.compile started (a keyword a compiled model is first
called with, passed on to its blocks) is traced when dynamo meets it: `ready_when_traced` runs
for real while dynamo traces the call (``torch._dynamo.assume_constant_result``), so the code is
there when dynamo reads it and the compiled graph does not break where the pattern is called.
It waits for `CALL_LOCK` at most `TRACE_TIME_WAIT` seconds (calls in other threads finish in
that time; one waiting for dynamo's compile lock, which this compile holds, never would); where
it cannot take it, or the trace fails, dynamo meets no code and the call falls back to
`GraphForward._slow_call` (a graph break, the results the same).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Protocol

import torch

from fxlora.runtime.calls import CALL_LOCK, outside_compile
from fxlora.runtime.idle import skippable_fixed
from fxlora.runtime.installed import live_roots
from fxlora.tracing.call_keys import CallKey
from fxlora.tracing.reuse import TraceCache
from fxlora.tracing.submodules import trees_fixed

__all__ = ["defer", "build_deferred", "build_if_compiling", "ready_when_traced"]


class _RootForward(Protocol):
    def trace_pending(self, wait: bool = True, cache: Optional[TraceCache] = None) -> bool: ...

    def build_gated(self, wait: bool = True, cache: Optional[TraceCache] = None) -> bool: ...

    def traced(self, key: Any, cache: Optional[TraceCache] = None) -> Any: ...

    def ensure(self, key: Any, eager: None = None) -> bool: ...

    def has_gated_code(self, key: Any) -> bool: ...

    root: Any


_DEFERRED: "weakref.WeakSet[_RootForward]" = weakref.WeakSet()

try:  # a C function: calling it opens no frame for torch.compile to compile
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # pragma: no cover - another torch

    def _eval_frame_callback() -> Any:
        return None


def build_deferred(wait: bool = False, isolated: bool = False) -> None:
    """Trace the pending patterns and build the gated code of every root waiting for it (each
    walking its trees once, identical roots sharing one `TraceCache`), and of the roots that
    tracing makes (nested roots); with `wait` False, a root whose lock another thread holds
    stays waiting. With `isolated`, a root whose build raises is left to build on first use
    (raising there, in its own call) instead of failing the caller (dynamo's compile of some
    other frame, another model's call)."""
    if not _DEFERRED:
        return
    tried: set[int] = set()
    cache = TraceCache()
    with trees_fixed():
        while waiting := [f for f in list(_DEFERRED) if id(f) not in tried]:  # tracing may make nested roots
            tried.update(map(id, waiting))
            traced = [f for f in waiting if _isolated(lambda f=f: f.trace_pending(wait, cache), isolated)]
            with skippable_fixed():  # every graph is there: a parent's `skippable` asks its nested roots'
                for forward in traced:
                    if _isolated(lambda f=forward: f.build_gated(wait, cache), isolated):
                        _DEFERRED.discard(forward)


def _isolated(step: Callable[[], bool], isolated: bool) -> bool:
    """`step()`; with `isolated`, True where it raises (not retried on every compile: its first
    use does the work, and raises, in its own call)."""
    try:
        return step()
    except Exception:
        if not isolated:
            raise
        return True


def _on_compile_start(*_: Any) -> None:
    build_deferred(wait=False, isolated=True)


def _handler() -> Optional[Any]:
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # another torch: gated code is built at once
        return None
    return callback_handler if isinstance(getattr(callback_handler, "start_callbacks", None), list) else None


#: dynamo's compile-callback registry (None on a torch without one: code is built at once)
_HANDLER = _handler()


def defer(forward: _RootForward) -> bool:
    """Have `forward`'s gated code built when torch.compile next compiles; False where this
    torch cannot call back (the caller builds it now). The callback is registered again where
    ``torch._dynamo.reset()`` removed it."""
    if _HANDLER is None:
        return False
    if _on_compile_start not in _HANDLER.start_callbacks:
        _HANDLER.register_start_callback(_on_compile_start)
    _DEFERRED.add(forward)
    return True


def _build_waiting() -> None:
    build_deferred(wait=True, isolated=True)  # every model's code, not only the caller's


# kept out of torch.compile, callees included: it would compile this frame (its generators)
_build_outside_compile = torch.compiler.disable(_build_waiting)


def _build_if_compiling() -> None:
    callback = _eval_frame_callback()
    if callback is not None and callback is not False and _DEFERRED:
        _build_outside_compile()


#: Build the deferred gated code now if torch.compile's frame evaluation is active around this
#: call. `fxlora.model.lora_model.LoraModel.forward`, which dynamo never traces, calls it before
#: the compiled model: this covers a compile-start callback that ``torch._dynamo.reset()``
#: removed after `defer`. Its own frame is kept out of torch.compile without switching frame
#: evaluation off (`fxlora.runtime.calls.outside_compile`), so that it sees whether it is on.
build_if_compiling = outside_compile(_build_if_compiling)


#: how long tracing a pattern met while dynamo traces waits for `CALL_LOCK` (module docstring)
TRACE_TIME_WAIT = 1.0


@torch._dynamo.assume_constant_result
def _ensure_at_trace_time(root_type: type, key: tuple) -> bool:
    key = CallKey(*key)  # dynamo rebuilds a NamedTuple argument wrong: it comes as a tuple
    with CALL_LOCK.exclusive(wait=TRACE_TIME_WAIT) as held:
        cache = TraceCache()  # identical roots, of any model: one trace
        for forward in [f for f in live_roots(root_type) if not f.has_gated_code(key)] if held else ():
            _isolated(lambda f=forward: f.traced(key, cache) is not None and f.ensure(key), True)
        return held


def ready_when_traced(forward: _RootForward, key: "CallKey") -> None:
    """Called by `forward` while dynamo traces its call with pattern `key`: trace the pattern if
    new and build its gated code, at trace time (module docstring), for every live root of the
    same class that lacks it (identical blocks: one trace). The roots are found by class, not by
    `forward` itself or its model, so that dynamo guards on neither: identical blocks compiled one
    by one, in one model or several, still share their compiled code. What raises here is left
    to the call itself, which raises outside the graph."""
    _ensure_at_trace_time(type(forward.root), tuple(key))
