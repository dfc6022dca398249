"""The forwards fxlora installs on adapted layers and `modules_to_save` modules (as the instance
attribute ``forward``; `fxlora.runtime.forwards` installs them, and the graph roots' forward).

- `EagerLoraForward` on every adapted layer: the layer's own forward, then
  `fxlora.core.branch.lora_output`, the same function the graph path traces (a layer whose kind
  computes its adapted call itself, `LayerKind.own_call`: `fxlora.core.branch.own_output`, which
  graph code calls through this forward). Graph code calls the layer with ``BASE_ONLY`` and
  inserts the branch as nodes; any other call (a path no graph covers, another method of the
  model) gets the branch eagerly.
- `SavedForward` on every `modules_to_save` module, likewise.

`with_call_gates` gives any of fxlora's forwards the gates of the call in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from fxlora.core.branch import lora_output, own_output, saved_output
from fxlora.core.gates import EagerKey, GateState
from fxlora.core.layers import BASE_ONLY, GUARD_IDLE, target_meta
from fxlora.core.ops import any_open
from fxlora.core.own_rows import ROWS_OF
from fxlora.runtime.installed import installs

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.state import AdapterState

__all__ = ["EagerLoraForward", "SavedForward", "with_call_gates", "call_original"]


def call_original(module: nn.Module, previous: Optional[Callable], args: tuple, kwargs: dict) -> Any:
    if previous is not None:
        return previous(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def with_call_gates(owner: "AdapterState", fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``fn(gates, eager, args, kwargs)`` with the gates of the call in flight: under
    torch.compile the current state and gated code (no lock, no pin: dynamo traces neither);
    inside a call of this model its pinned state (that call holds the lock); else a new call's
    context (`AdapterState.calling`)."""
    if torch.compiler.is_compiling():
        return fn(owner.current(), None, args, kwargs)
    pinned = owner.pin.get()
    if pinned is not None:
        return fn(pinned, pinned.eager, args, kwargs)
    with owner.calling() as gates:
        return fn(gates, gates.eager, args, kwargs)


@installs
class _EagerForward:
    """The forward installed on every adapted (or saved) module, whichever path its branch takes:
    called from anywhere (the model's ``forward``, another method such as timm's
    ``forward_features``, a library reaching into a container), the module computes with LoRA,
    with the gates of the call in flight (`fxlora.model.state.AdapterState.calling`). Graph code calls
    it with ``BASE_ONLY=True`` and adds the branch as graph nodes. `previous` is the instance
    forward it replaced (None: the class's own)."""

    path = "eager"

    def __init__(self, module: nn.Module, owner: AdapterState, previous: Optional[Callable] = None) -> None:
        self.module = module
        self.owner = owner
        self.previous = previous

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return call_original(self.module, self.previous, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop(BASE_ONLY, False):
            return self.original(*args, **kwargs)
        return with_call_gates(self.owner, self.compute, args, kwargs)

    def compute(self, gates: GateState, eager: Optional[EagerKey], args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError


class EagerLoraForward(_EagerForward):
    """``forward`` of an adapted layer: base output plus `lora_output`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop(GUARD_IDLE, False) and torch.compiler.is_compiling() and self._guardable(args, kwargs):
            return self._guarded(args[0], self.owner.current())
        return super().__call__(*args, **kwargs)

    def compute(self, gates: GateState, eager: Optional[EagerKey], args: tuple, kwargs: dict) -> Any:
        if target_meta(self.module).kind.own_call:
            rows_of = kwargs.pop(ROWS_OF, None)  # graph code: the batch-first tensor its input was reshaped from
            return own_output(self.module, args, kwargs, gates, eager, rows_of)
        base = self.original(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        return lora_output(self.module, x, base, gates, eager)

    @staticmethod
    def _guardable(args: tuple, kwargs: dict) -> bool:
        return len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)

    def _guarded(self, x: torch.Tensor, gates: GateState) -> torch.Tensor:
        """Compiled evaluation code (`fxlora.passes.guard_idle`): the branches run only when one of
        the layer's gates is open, decided at run time, so no state change recompiles."""
        module = self.module
        open_gates = [gates.scale_of(a, x) for a in target_meta(module).adapters]

        def with_lora(x: torch.Tensor) -> torch.Tensor:
            return lora_output(module, x, self.original(x), gates, None)

        return torch.cond(any_open(open_gates), with_lora, self.original, (x,))


class SavedForward(_EagerForward):
    """``forward`` of a `modules_to_save` module: the selected trainable copy's output."""

    def compute(self, gates: GateState, eager: Optional[EagerKey], args: tuple, kwargs: dict) -> Any:
        return saved_output(self.module, self.original, args, kwargs, gates, eager)
