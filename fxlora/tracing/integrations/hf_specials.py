"""transformers model code that branches on sizes or loops over them, kept exact.

While fxlora traces, names in model modules are shadowed by versions that record one
``call_function`` node of the original when an argument is traced (so the graph computes the same
thing from the same real values) and call the original directly otherwise; the shadowing ends
when tracing ends.

All of them are listed in `OPAQUE_FUNCTIONS`:

- MPT's attention computes ``max(0, position_bias.size(1) - query_length)``: Python's ``max``
  would compare a proxy. The builtin becomes one node.
- RWKV's ``rwkv_linear_attention`` loops over the sequence
  (``for t in range(seq_length)``), which no graph of symbolic sizes can hold. The function
  becomes one node; what it returns is known from its arguments (`_rwkv_attention`): the
  output, and the new state only when one was given or asked for (else None, as the function
  returns it), so code testing ``layer_state is not None`` takes the branch the real call takes.
"""

from __future__ import annotations

import builtins
import contextlib
import sys
from typing import Any, Callable, Iterator

import torch.fx as fx

from fxlora.tracing.integrations import opaque, tracer_of
from fxlora.tracing.proxies import NotTraceable, SeqInfo, TensorInfo

__all__ = ["OPAQUE_FUNCTIONS", "traced_builtins"]


def _rwkv_attention(fn: Callable) -> Callable:
    """``rwkv_linear_attention(time_decay, time_first, key, value, state=None, return_state=False)``
    as one node: returns ``(output (batch, seq, hidden), state)``, the state a list of three
    (batch, hidden) tensors when `state` is given or `return_state` is true, else None."""

    def call(time_decay: Any, time_first: Any, key: Any, value: Any, state: Any = None, return_state: Any = False) -> Any:
        tracer = tracer_of((time_decay, time_first, key, value, state, return_state))
        if tracer is None:
            return fn(time_decay, time_first, key, value, state=state, return_state=return_state)
        if isinstance(return_state, fx.Proxy) or isinstance(state, fx.Proxy):
            raise NotTraceable("rwkv_linear_attention with a traced state or return_state flag")
        result = tracer.create_proxy(
            "call_function", fn, (time_decay, time_first, key, value), {"state": state, "return_state": return_state}
        )
        output = result[0]
        output.info = TensorInfo(3)
        if state is None and not return_state:
            return output, None
        new_state = result[1]
        new_state.info = SeqInfo(items=(TensorInfo(2),) * 3)
        return output, new_state

    return call


#: model module -> {name: makes its tracing stand-in from the original (the module's own, or the builtin)}
OPAQUE_FUNCTIONS: dict[str, dict[str, Callable[[Callable], Callable]]] = {
    "transformers.models.mpt.modeling_mpt": {"max": opaque},
    "transformers.models.rwkv.modeling_rwkv": {"rwkv_linear_attention": _rwkv_attention},
}


@contextlib.contextmanager
def traced_builtins() -> Iterator[None]:
    """While active, the names of `OPAQUE_FUNCTIONS` are shadowed in their (already imported)
    modules; each original is put back afterwards (a builtin's shadow is removed)."""
    shadowed: list[tuple[dict, str, Any]] = []  # (namespace, name, original or _ABSENT)
    try:
        for module_name, functions in OPAQUE_FUNCTIONS.items():
            module = sys.modules.get(module_name)
            if module is None:
                continue
            for name, make in functions.items():
                original = module.__dict__.get(name, _ABSENT)
                current = getattr(builtins, name, None) if original is _ABSENT else original
                if callable(current):
                    module.__dict__[name] = make(current)
                    shadowed.append((module.__dict__, name, original))
        yield
    finally:
        for namespace, name, original in reversed(shadowed):
            if original is _ABSENT:
                namespace.pop(name, None)
            else:
                namespace[name] = original


_ABSENT = object()
