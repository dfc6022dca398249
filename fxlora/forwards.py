"""The forwards fxlora installs on the user's modules (as the instance attribute ``forward``).

- `GraphForward` on a *graph root*: runs the LoRA-rewritten graph code with ``self`` bound to the
  root module itself, so every attribute it reads is the live one (no copy of the model exists).
- `EagerLoraForward` on every adapted layer: the layer's own forward, then
  `fxlora.branch.lora_output`, the same function the graph path traces. Graph code calls the layer
  with ``BASE_ONLY`` and inserts the branch as nodes; any other call (a path no graph covers,
  another method of the model) gets the branch eagerly.
- `SavedForward` on every `modules_to_save` module, likewise.

The module's class, parameters and ``state_dict()`` keys never change; deleting the instance
attribute (`uninstall`) gives back the class's own forward.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _forward_from_src

from .branch import lora_output, saved_output
from .layers import BASE_ONLY, GUARD_IDLE, saved_meta, target_meta
from .ops import any_open
from .passes import PassOptions, rewrite
from .tracing import (
    CallKey,
    adopt_constants,
    TraceFailure,
    TracedVariant,
    call_key,
    canonical_key,
    gather_inputs,
    guards_hold,
    key_is_ranked,
    with_training,
    trace_through_ids,
    trace_variant,
)

__all__ = [
    "BASE_ONLY",
    "GraphForward",
    "EagerLoraForward",
    "SavedForward",
    "installed_forward",
    "install",
    "uninstall",
    "compile_graph",
]


def compile_graph(graph: fx.Graph) -> Callable[..., Any]:
    """Python function ``forward(self, *inputs)`` generated from `graph`."""
    code = graph.python_code(root_module="self")
    return _forward_from_src(code.src, code.globals)


def installed_forward(module: nn.Module) -> Optional[Any]:
    """The fxlora forward installed on `module`, if any."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, (GraphForward, EagerLoraForward, SavedForward)) else None


def install(module: nn.Module, forward: Any) -> None:
    module.__dict__["forward"] = forward


def uninstall(module: nn.Module) -> None:
    """Give `module` back the forward it had before fxlora."""
    fwd = installed_forward(module)
    if fwd is None:
        return
    if fwd.previous is not None:
        module.__dict__["forward"] = fwd.previous
    else:
        del module.__dict__["forward"]


def eager_state(gates: nn.Module) -> Optional[tuple]:
    """The Python mirror of the adapter state when running eagerly; None under torch.compile
    (whose code reads only the gate tensors, so state changes never recompile)."""
    if torch.compiler.is_compiling():
        return None
    return gates.eager_state


def _find_gates(root: nn.Module) -> Optional[nn.Module]:
    for module in root.modules():
        gates = module._modules.get("lora_gates")
        if gates is not None:
            return gates
    return None


def _call_original(module: nn.Module, previous: Optional[Callable], args: tuple, kwargs: dict) -> Any:
    if previous is not None:
        return previous(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


class _EagerForward:
    """The forward installed on every adapted (or saved) module, whichever path its branch takes:
    called from anywhere (the model's ``forward``, another method such as timm's
    ``forward_features``, a library reaching into a container), the module computes with LoRA.
    Graph code calls it with ``BASE_ONLY=True`` and adds the branch as graph nodes. `previous` is
    the instance forward it replaced (None: the class's own)."""

    path = "eager"

    def __init__(self, module: nn.Module, previous: Optional[Callable] = None) -> None:
        self.module = module
        self.previous = previous

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return _call_original(self.module, self.previous, args, kwargs)


class EagerLoraForward(_EagerForward):
    """``forward`` of an adapted layer: base output plus `lora_output`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop(BASE_ONLY, False):
            return self.original(*args, **kwargs)
        if kwargs.pop(GUARD_IDLE, False) and torch.compiler.is_compiling() and self._guardable(args, kwargs):
            return self._guarded(args[0])
        base = self.original(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        state = eager_state(self.module.lora_gates)
        return lora_output(self.module, x, base, None if state is None else state[0])

    @staticmethod
    def _guardable(args: tuple, kwargs: dict) -> bool:
        return len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)

    def _guarded(self, x: torch.Tensor) -> torch.Tensor:
        """Compiled evaluation code (`fxlora.passes.guard_idle`): the branches run only when one of
        the layer's gates is open, decided at run time, so no state change recompiles."""
        module = self.module
        gates = [getattr(module.lora_gates.scale, a) for a in target_meta(module).adapters]

        def with_lora(x: torch.Tensor) -> torch.Tensor:
            return lora_output(module, x, self.original(x), None)

        return torch.cond(any_open(gates), with_lora, self.original, (x,))


class SavedForward(_EagerForward):
    """``forward`` of a `modules_to_save` module: the selected trainable copy's output."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop(BASE_ONLY, False):
            return self.original(*args, **kwargs)
        state = eager_state(self.module.lora_gates)
        return saved_output(self.module, self.original, args, kwargs, None if state is None else state[1])


def _interesting(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if target_meta(m) is not None or saved_meta(m) is not None]


class GraphForward:
    """``forward`` of a graph root: one rewritten graph per call pattern (`fxlora.tracing`).

    A call whose pattern has a graph runs that graph's generated code: straight-line tensor code,
    so ``torch.compile`` captures it whole. A new pattern is traced on first use; a pattern that
    cannot be traced runs the root's original forward with the eager LoRA forwards installed on its
    layers for the duration of the call (same math, no graph).
    """

    path = "graph"

    def __init__(
        self,
        root: nn.Module,
        variants: dict[CallKey, TracedVariant],
        previous: Optional[Callable] = None,
        options: Optional[PassOptions] = None,
    ):
        self.root = root
        self.previous = previous
        self.options = options or PassOptions()
        self.gates = _find_gates(root)
        self.variants = dict(variants)
        self.failures: dict[CallKey, str] = {}
        # code per (call pattern, adapter state): state None = gated code (what torch.compile
        # sees); a known eager state gets code that runs only the live branches
        self._compiled: dict[tuple, tuple[Callable[..., Any], Optional[tuple]]] = {}
        # patterns fix tensor ranks when the planned ones needed them (`fxlora.tracing.call_key`)
        self.ranked = any(key_is_ranked(k) for k in self.variants)

    # ---------------------------------------------------------------- building
    def _build(self, key: CallKey, variant: TracedVariant, state: Optional[tuple] = None) -> tuple[Callable[..., Any], Optional[tuple]]:
        """Code for `variant` in adapter `state`, and where its inputs come from (None: the
        call's positional arguments as they are, the common case)."""
        adopt_constants(self.root, variant.constants or {})
        graph = rewrite(copy.deepcopy(variant.graph), self.root, self.options, state, training=key[0])
        _, positional, named = key
        direct = not named and variant.inputs == tuple(range(len(positional)))
        return compile_graph(graph), (None if direct else variant.inputs)

    def refresh(self) -> None:
        """Rebuild every known pattern's gated code from its traced graph (after adapters
        changed); code for eager states is rebuilt on first use."""
        self._compiled = {(key, None): self._build(key, variant) for key, variant in self.variants.items()}

    def retrace(self) -> None:
        """Trace every known pattern again (after the set of adapted modules changed)."""
        through = trace_through_ids(self.root, _interesting(self.root))
        variants = {}
        for key in self.variants:
            try:
                variants[key] = trace_variant(self.root, through, key)
            except TraceFailure as exc:
                self.failures[key] = str(exc)
        self.variants = variants
        self.refresh()

    def ensure(self, key: CallKey, state: Optional[tuple] = None) -> bool:
        """Make sure pattern `key` has code for adapter `state` (tracing it if new); False if it
        cannot be traced."""
        if (key, state) in self._compiled:
            if guards_hold(self.variants[key].guards):
                return True
            self._forget(key)  # an attribute the graph baked in changed
        if key in self.failures:
            return False
        variant = self.variants.get(key)
        if variant is None:
            try:
                variant = trace_variant(self.root, trace_through_ids(self.root, _interesting(self.root)), key)
            except TraceFailure as exc:
                self.failures[key] = str(exc)
                return False
            self.variants[key] = variant
        self._compiled[(key, state)] = self._build(key, variant, state)
        return True

    def _forget(self, key: CallKey) -> None:
        self.variants.pop(key, None)
        for entry in [e for e in self._compiled if e[0] == key]:
            del self._compiled[entry]

    def prepare(self, training: bool) -> bool:
        """Trace and build the plainest call pattern, and the train/eval twin of every known
        pattern, for that mode ahead of use (so that a compiled model does not meet an untraced
        pattern)."""
        keys = [with_training(k, training) for k in list(self.variants)]
        if not self.ranked:  # a ranked root is never called with the rank-free plainest pattern
            keys.insert(0, canonical_key(self.root, training))
        return all([self.ensure(k) for k in keys])

    def graph_code(self, training: Optional[bool] = None) -> str:
        """The generated code of the plainest call pattern (for inspection)."""
        key = canonical_key(self.root, self.root.training if training is None else training)
        variant = self.variants.get(key) or next(iter(self.variants.values()))
        graph = rewrite(copy.deepcopy(variant.graph), self.root, self.options, training=key[0])
        return graph.python_code("self").src

    # ---------------------------------------------------------------- calling
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = call_key(self.root.training, args, kwargs, self.ranked)
        state = eager_state(self.gates) if self.gates is not None else None
        entry = self._compiled.get((key, state))
        if entry is None or not guards_hold(self.variants[key].guards):
            return self._slow_call(key, state, args, kwargs)
        fn, inputs = entry
        if inputs is None:
            return fn(self.root, *args)
        return fn(self.root, *gather_inputs(inputs, self.root, args, kwargs))

    @torch.compiler.disable
    def _slow_call(self, key: Optional[CallKey], state: Optional[tuple], args: tuple, kwargs: dict) -> Any:
        if key is not None and self.ensure(key, state):
            return self(*args, **kwargs)
        return self._run_eagerly(args, kwargs)

    def _run_eagerly(self, args: tuple, kwargs: dict) -> Any:
        """The original forward: its adapted layers compute their branches themselves."""
        return _call_original(self.root, self.previous, args, kwargs)

    # ---------------------------------------------------------------- copying
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = {}  # generated code is rebuilt from the graphs on first use
        return state
