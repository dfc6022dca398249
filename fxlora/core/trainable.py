"""Which parameters train: the adapters' weights and copies, and the base biases their ``bias``
settings name (PEFT's rule), found through where they live (`Slot`), so that a parameter replaced
in its module (``load_state_dict(assign=True)``) is still found."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch.nn as nn

from fxlora.core.layers import LORA_CHILDREN, adapter_holders, saved_meta, target_meta

__all__ = ["Slot", "lora_slots", "lora_parameters", "bias_slots", "set_trainable", "TrainableFlags"]

#: where a parameter lives: its owning module and its name in that module's ``_parameters``
Slot = tuple[nn.Module, str]
#: the holders of an adapted layer's trainable factors
_FACTOR_HOLDERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _slots_of(module: nn.Module) -> Iterator[Slot]:
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                yield sub, name


def lora_slots(model: nn.Module, adapter: str) -> Iterator[Slot]:
    """Where the LoRA weights (A, B, their biases, DoRA magnitudes) and `modules_to_save` copies of one adapter
    live."""
    for module in model.modules():
        if target_meta(module) is not None:
            for path, child in adapter_holders(module):
                if path.rpartition(".")[2] in _FACTOR_HOLDERS and adapter in child:
                    yield from ([(child, adapter)] if isinstance(child, nn.ParameterDict) else _slots_of(child[adapter]))
        meta = saved_meta(module)
        if meta is not None and adapter in meta.adapters:
            yield from _slots_of(module.modules_to_save[adapter])


def lora_parameters(model: nn.Module, adapter: str) -> Iterator[nn.Parameter]:
    """The LoRA weights (A, B, their biases) and `modules_to_save` copies of one adapter."""
    return (owner._parameters[name] for owner, name in lora_slots(model, adapter))


def bias_slots(model: nn.Module, bias: str, targets: Iterable[nn.Module], saved: Iterable[nn.Module]) -> Iterator[Slot]:
    """The one ``bias=`` rule: where the base biases a ``bias`` setting trains live, for an
    adapter on the layers `targets` with the `modules_to_save` modules `saved` (attached or only
    planned): "all" every parameter named ``bias`` of the base model (not of fxlora's modules, nor
    of the originals of `saved` modules), "lora_only" those of `targets`, "none" none."""
    if bias == "none":
        return
    if bias == "lora_only":
        for m in targets:
            if m._parameters.get("bias") is not None:
                yield m, "bias"
        return
    saved_originals = {id(p) for m in saved for p in _own_params(m)}
    internal = {id(p) for m in model.modules() for p in _fxlora_params(m)}
    seen = set()
    for m in model.modules():
        p = m._parameters.get("bias")
        if p is not None and id(p) not in saved_originals and id(p) not in internal and id(p) not in seen:
            seen.add(id(p))
            yield m, "bias"


def _bias_slots(model: nn.Module, bias: str) -> Iterator[Slot]:
    """`bias_slots` for the adapters attached to `model` (each walk of the tree made only if
    the setting reads it: none for "none")."""
    targets = (m for m in model.modules() if target_meta(m) is not None)
    saved = (m for m in model.modules() if saved_meta(m) is not None)
    return bias_slots(model, bias, targets, saved)


def _fxlora_params(module: nn.Module) -> Iterator[nn.Parameter]:

    for name in LORA_CHILDREN:
        child = module._modules.get(name)
        if child is not None:
            yield from child.parameters()


def _own_params(module: nn.Module) -> Iterator[nn.Parameter]:
    internal = {id(p) for p in _fxlora_params(module)}
    return (p for p in module.parameters() if id(p) not in internal)


def set_trainable(model: nn.Module, adapters: dict[str, str]) -> None:
    """Freeze everything, then let the given adapters' weights and copies train, and the base
    biases their ``bias`` settings ("none", "all", "lora_only") ask for."""
    on = [owner._parameters[name] for adapter, bias in adapters.items() for owner, name in [*lora_slots(model, adapter), *_bias_slots(model, bias)]]
    ids = {id(p) for p in on}
    for p in model.parameters():  # each flag set only where it changes
        if p.requires_grad and id(p) not in ids:
            p.requires_grad_(False)
    for p in on:
        if not p.requires_grad:
            p.requires_grad_(True)


class TrainableFlags:
    """Keeps ``requires_grad`` following the trainable adapters of a model, touching on each change
    only the parameters whose flag changes.

    The first `apply` (and the first after `invalidate`, which adding or removing adapters calls)
    sets every flag as `set_trainable` does: everything frozen, then the given adapters' weights
    and copies and the base biases their ``bias`` settings ask for. Later calls set the flags of
    the wanted adapters' parameters and clear those of the ones switched off, found through per-adapter
    lists of where they live (`Slot`: a parameter replaced in its module, as by
    ``load_state_dict(assign=True)``, is still found): a switch walks no module tree.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._applied: Optional[dict[str, str]] = None
        self._slots: dict[tuple[str, str], tuple[Slot, ...]] = {}  # ("adapter" | "bias", name) -> slots

    def invalidate(self) -> None:
        """Forget the slot lists and the applied state (the model's adapters changed)."""
        self._applied = None
        self._slots = {}

    def apply(self, adapters: dict[str, str]) -> None:
        """Let exactly `adapters` (name -> ``bias`` setting) train."""
        if self._applied is None:
            set_trainable(self.model, adapters)
            self._applied = dict(adapters)
            return
        wanted = _keys(adapters)
        dropped = _keys(self._applied) - wanted
        on = [slot for key in wanted for slot in self._slots_of(key)]
        off = [slot for key in dropped for slot in self._slots_of(key)]
        if any(kind == "bias" for kind, _ in dropped):  # bias settings may share parameters
            keep = {(id(owner), name) for owner, name in on}
            off = [(owner, name) for owner, name in off if (id(owner), name) not in keep]
        for owner, name in off:
            owner._parameters[name].requires_grad_(False)
        for owner, name in on:
            owner._parameters[name].requires_grad_(True)
        self._applied = dict(adapters)

    def _slots_of(self, key: tuple[str, str]) -> tuple[Slot, ...]:
        """Where the parameters of an adapter (``("adapter", name)``) or a bias setting
        (``("bias", setting)``) live; an adapter's never overlap anything else's."""
        if key not in self._slots:
            kind, name = key
            self._slots[key] = tuple(lora_slots(self.model, name) if kind == "adapter" else _bias_slots(self.model, name))
        return self._slots[key]

    def __getstate__(self) -> dict:
        return {"model": self.model, "_applied": None, "_slots": {}}  # a copy starts afresh


def _keys(adapters: dict[str, str]) -> set[tuple[str, str]]:
    return {("adapter", a) for a in adapters} | {("bias", b) for b in adapters.values()}
