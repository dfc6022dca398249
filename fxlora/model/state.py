"""`AdapterState`: the one owner of a LoRA model's adapter state.

Everything that says *how* the adapted model computes, beyond its tensors, lives here and nowhere
else: the adapters' configs, which are active, whether adapters are enabled, each adapter's run-time
scale, which adapters are merged (the merge steps), which may train, the graph pass options and the
trace policy. `fxlora.LoraModel` composes one; its methods change it through this class's methods.

From that state this class derives (never stores twice) the gates the adapted layers read:
`publish` makes a new immutable `fxlora.core.gates.GateState` after each change, and `calling` pins one
state for a call in this thread (`fxlora.runtime.calls`). The gates are derived from Python values, so
they hold the right numbers on any device, after ``to_empty()`` or ``torch.load`` alike.

`transaction` is the one helper behind every all-or-nothing operation: it restores this state and
the model's ``requires_grad`` flags, and runs the undo steps the operation registered, if the
operation fails.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from fxlora.core.trainable import TrainableFlags
from fxlora.runtime.calls import CALL_LOCK, Pin
from fxlora.config import LoraConfig
from fxlora.core.fold import FoldRecord
from fxlora.core.gates import GateState, make_gate_state, make_row_gate_state
from fxlora.passes.options import PassOptions
from fxlora.errors import VariantError
from fxlora.variants import branch_gate, variant_for

__all__ = ["AdapterState", "CallScope", "MergeStep", "Transaction"]


@dataclass
class MergeStep:
    """One `merge_adapter` call: the adapters it folded (name -> run-time scale) and, per layer
    name, the record that undoes it."""

    scales: dict[str, float]
    records: dict[str, FoldRecord]


class CallContext:
    """`AdapterState.calling`: a shared hold of `CALL_LOCK`, then a pin (a class, not a
    generator: every call enters one)."""

    __slots__ = ("_hold", "_pin")

    def __init__(self, hold: Any, pin: Any) -> None:
        self._hold, self._pin = hold, pin

    def __enter__(self) -> GateState:
        self._hold.__enter__()
        try:
            return self._pin.__enter__()
        except BaseException:
            self._hold.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self._pin.__exit__(*exc)
        finally:
            self._hold.__exit__(*exc)


class CallScope:
    """The context of one call (`AdapterState.calling`), entered and left outside torch.compile."""

    def __init__(self, owner: "AdapterState", state: Optional[GateState]) -> None:
        self._owner = owner
        self._state = state

    @torch.compiler.disable
    def __enter__(self) -> GateState:
        self._context = self._owner.calling(self._state)
        return self._context.__enter__()

    @torch.compiler.disable
    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


@dataclass
class Transaction:
    """Undo steps of an all-or-nothing operation in flight (run in reverse if it fails)."""

    undo_steps: list[Callable[[], None]] = field(default_factory=list)

    def on_undo(self, step: Callable[[], None]) -> None:
        self.undo_steps.append(step)


class AdapterState:
    """Adapter configs, activity, scales, merges, trainability and pass options of one model."""

    def __init__(self, model: nn.Module, trace_policy: str = "auto") -> None:
        self.configs: dict[str, LoraConfig] = {}
        self.reports: dict[str, Any] = {}  # adapter -> fxlora.planning.explain.Report
        self.active: list[str] = []
        self.enabled = True
        self.scales: dict[str, float] = {}  # run-time scale per adapter (default 1.0)
        self.trainable: dict[str, bool] = {}
        self.merge_steps: list[MergeStep] = []
        self.options = PassOptions()
        self.trace_policy = trace_policy
        self.base_requires_grad: dict[str, bool] = {}  # the user's flags, restored by unload()
        self.flags = TrainableFlags(model)
        self.flags_stale = False
        self.device: Optional[torch.device] = next((p.device for p in model.parameters()), None)
        self.pin = Pin()
        self._last_published: tuple = ([], True, {})
        self.published: GateState = make_gate_state({}, {}, self._gate_device())

    # ---------------------------------------------------------------- derived facts
    @property
    def merged_scale(self) -> dict[str, float]:
        """Scale each merged adapter was folded in with."""
        return {a: s for step in self.merge_steps for a, s in step.scales.items()}

    @property
    def merged_adapters(self) -> list[str]:
        return [a for step in self.merge_steps for a in step.scales]

    def scale_of(self, adapter: str) -> float:
        return self.scales.get(adapter, 1.0)

    def check_known(self, names: Any) -> list[str]:
        """`names` (one name or several) as a list of existing adapters, or a clear error."""
        if names is None:
            raise ValueError(f"give an adapter name or a list of them; existing adapters: {list(self.configs)}")
        listed = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else None
        if listed is None:
            raise TypeError(f"adapter names must be a str or a list of str, got {type(names).__name__}")
        if not listed:
            raise ValueError(f"give at least one adapter name; existing adapters: {list(self.configs)}")
        for name in listed:
            if name not in self.configs:
                raise ValueError(f"unknown adapter {name!r}; existing adapters: {list(self.configs)}")
        return listed

    # ---------------------------------------------------------------- gates
    def gate_values(self, adapter: str) -> tuple[float, float]:
        """(scale gate, select gate) of an adapter. The scale gate is what the branch adds on top
        of the weights: the wanted scale (0 when inactive or disabled) minus the scale the adapter
        was merged with, so a merged adapter that is switched off is subtracted again
        (`fxlora.variants.branch_gate`: the adapter's variant must be additive)."""
        on = self.enabled and adapter in self.active
        wanted = self.scale_of(adapter) if on else 0.0
        gate = branch_gate(variant_for(self.configs[adapter]), wanted, self.merged_scale.get(adapter, 0.0))
        return gate, 1.0 if on else 0.0

    def publish(self) -> None:
        """Make the gate state of the current adapter state the one new calls read (O(adapters);
        calls in flight keep the one they pinned). A state the gates cannot express (a merged
        adapter of a non-additive variant switched off or rescaled: `VariantError`) is refused:
        the active adapters, the enabled flag and the scales are put back as last published."""
        try:
            self._check_order()
            values = {a: self.gate_values(a) for a in self.configs}
        except VariantError:  # a merged DoRA adapter switched: the change is taken back
            self.active, self.enabled, self.scales = self._last_published
            raise
        self._last_published = (list(self.active), self.enabled, dict(self.scales))
        self.published = make_gate_state(
            {a: v[0] for a, v in values.items()}, {a: v[1] for a, v in values.items()}, self._gate_device()
        )

    def _check_order(self) -> None:
        """`VariantError` for several active adapters, one of them DoRA, listed in another order
        than they were added: a DoRA adapter rescales the output of those before it
        (`fxlora.core.branch`), and fxlora's layers apply their adapters in the order they were
        added, where PEFT follows the active list."""
        if len(self.active) < 2 or not any(variant_for(self.configs[a]).magnitude for a in self.active):
            return
        added = [a for a in self.configs if a in self.active]
        if added != list(self.active):
            raise VariantError(
                f"active adapters {list(self.active)} include a DoRA adapter, which rescales the output of the adapters "
                f"applied before it, and fxlora applies them in the order they were added: activate them as {added}"
            )

    def row_state(self, names: list[str]) -> GateState:
        """The gate state of one mixed batch (row ``i`` uses adapter ``names[i]``), for that call
        alone. Requires: `names` checked (`fxlora.model.mixed_batch.check_adapter_names`)."""
        used = {a for a in self.configs if self.enabled and a in names}
        wanted = {a: self.scale_of(a) if a in used else 0.0 for a in self.configs}
        variants = {a: variant_for(config) for a, config in self.configs.items()}
        return make_row_gate_state(names, wanted, used, self.merged_scale, variants, self._gate_device())

    def current(self) -> GateState:
        """The state this thread's call pinned, else the published one."""
        pinned = self.pin.get()
        return self.published if pinned is None else pinned

    def calling(self, state: Optional[GateState] = None) -> "CallContext":
        """The context of one call: `CALL_LOCK` held shared and a gate state pinned (`state`, or the
        published one unless this thread's call already pinned one); entering it gives that state."""
        return CallContext(CALL_LOCK.shared(), self.pin.hold(self.published if state is None else state, replace=state is not None))

    def scope(self, state: Optional[GateState] = None) -> "CallScope":
        """`calling` as an object with ``__enter__`` / ``__exit__`` kept out of ``torch.compile``
        (for ``LoraModel.forward``, whose callees dynamo compiles: a generator frame cannot be)."""
        return CallScope(self, state)

    def moved_to(self, device: Optional[torch.device]) -> None:
        """The model's tensors moved (``.to()``, ``to_empty()``): gates follow."""
        self.device = device
        self.publish()

    def _gate_device(self) -> Optional[torch.device]:
        return None if self.device is None or self.device.type == "meta" else self.device

    # ---------------------------------------------------------------- trainable flags
    def sync_trainable(self, training: bool, force: bool = False) -> None:
        """Let exactly the active, trainable adapters train. Deferred while in eval mode (applied
        by ``train()`` and by the parameter reports), so switching adapters to serve stays cheap;
        in train mode only the parameters of the adapters switched on or off are touched."""
        if not (training or force):
            self.flags_stale = True
            return
        wanted = {a: self.configs[a].bias for a in self.active if self.trainable.get(a, True)}
        self.flags.apply(wanted)
        self.flags_stale = False

    # ---------------------------------------------------------------- all or nothing
    @contextlib.contextmanager
    def transaction(self, model: nn.Module) -> Iterator[Transaction]:
        """Run an operation all or nothing: should it raise, its registered undo steps run (last
        first), then this state and the ``requires_grad`` flags of `model` are restored and the
        gates republished, and the exception propagates."""
        saved = self._fields()
        flags = {id(p): p.requires_grad for p in model.parameters()}
        tx = Transaction()
        try:
            yield tx
        except BaseException:
            for step in reversed(tx.undo_steps):
                step()
            self.__dict__.update(saved)
            for p in model.parameters():
                if id(p) in flags:
                    p.requires_grad_(flags[id(p)])
            self.flags.invalidate()
            self.publish()
            raise

    def _fields(self) -> dict[str, Any]:
        plain = ("configs", "reports", "active", "scales", "trainable", "merge_steps", "base_requires_grad")
        saved = {name: copy.copy(getattr(self, name)) for name in plain}
        saved.update(enabled=self.enabled, options=self.options, flags_stale=self.flags_stale, published=self.published)
        saved["_last_published"] = self._last_published
        return saved

    # ---------------------------------------------------------------- copying
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("published")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.publish()  # derived: rebuilt, never trusted
