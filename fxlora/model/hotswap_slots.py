"""Hot-swap slots (`fxlora.model.hotswap`): an adapter's layers padded to a rank, each with its own
spec holding its scaling as a tensor (`fxlora.core.layers.AdapterSpec.scaling_cell`), and the
config that says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn

from fxlora.config import LoraConfig, scaling_value
from fxlora.core.layers import AdapterSpec, target_meta
from fxlora.io.peft_format import layout_of_adapter
from fxlora.runtime.forwards import graph_forwards
from fxlora.runtime.install import refresh_all

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.lora_model import LoraModel

__all__ = ["SlotLayer", "slot_layers", "make_slot", "alpha_for", "pinned_config", "rebuild_code"]


@dataclass
class SlotLayer:
    """One adapted layer of a slot: its name, module and spec, and the incoming adapter's spec."""

    name: str
    module: nn.Module
    spec: AdapterSpec
    incoming: Optional[AdapterSpec] = None


def slot_layers(lm: "LoraModel", adapter: str) -> list[SlotLayer]:
    found = []
    for name, module in lm.model.named_modules():
        meta = target_meta(module)
        if meta is not None and adapter in meta.adapters:
            found.append(SlotLayer(name, module, meta.adapters[adapter]))
    return found


def make_slot(lm: "LoraModel", adapter: str, layers: list[SlotLayer], ranks: dict[str, int], tx: Any) -> None:
    """Pad `adapter`'s layers to `ranks`, give each layer its own spec with a scaling tensor, and
    record the config that says so (undo steps registered on `tx`)."""
    state = lm.adapter_state
    layout = layout_of_adapter(lm.model, adapter, state.configs[adapter].bias)
    for layer in layers:
        meta = target_meta(layer.module)
        old_spec = layer.spec
        rank = ranks[layer.name]
        spec = AdapterSpec(rank, alpha_for(old_spec.scaling, rank, old_spec.use_rslora, old_spec.alpha),
                           old_spec.use_rslora, old_spec.lora_bias, old_spec.dropout, old_spec.variant)
        spec.scaling_cell = torch.tensor(old_spec.scaling, dtype=torch.float32, device=_device_of(layer.module, adapter))
        if spec.r != old_spec.r:
            for suffix, shape in meta.kind.factor_shapes(layer.module, spec).items():
                _pad_parameter(lm.model, layout.slots[f"{layer.name}.{suffix}"].key, shape, tx)
        meta.adapters[adapter] = spec
        tx.on_undo(lambda meta=meta, old=old_spec: meta.adapters.__setitem__(adapter, old))
        layer.spec = spec
    state.configs[adapter] = pinned_config(state.configs[adapter], layers)
    state.flags.invalidate()


def _device_of(module: nn.Module, adapter: str) -> torch.device:
    tensors = [p for n, p in module.named_parameters() if f".{adapter}." in f".{n}."]
    return tensors[0].device if tensors else torch.device("cpu")


def _pad_parameter(model: nn.Module, key: str, shape: tuple[int, ...], tx: Any) -> None:
    """Replace the parameter at state-dict `key` by one of `shape`, the old values in its leading
    corner and zeros elsewhere (same dtype, device and ``requires_grad``)."""
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[leaf]
    if tuple(old.shape) == tuple(shape):
        return
    padded = old.detach().new_zeros(shape)
    padded[tuple(slice(0, n) for n in old.shape)] = old.detach()
    owner._parameters[leaf] = nn.Parameter(padded, requires_grad=old.requires_grad)
    _resync_sizes(owner)

    def undo() -> None:
        owner._parameters[leaf] = old
        _resync_sizes(owner)

    tx.on_undo(undo)


def _resync_sizes(module: nn.Module) -> None:
    """A factor module's size attributes after its weight changed shape (nn.Linear, ConvNd)."""
    weight = module._parameters.get("weight")
    if weight is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        first, second = weight.shape[0], weight.shape[1] * module.groups
        module.in_channels, module.out_channels = (first, second) if module.transposed else (second, first)


def alpha_for(scaling: float, rank: int, use_rslora: bool, prefer: float) -> float:
    """The alpha whose scaling at `rank` is `scaling` (`prefer` if it is one), exactly where a
    float allows."""
    if scaling_value(prefer, rank, use_rslora) == scaling:
        return prefer
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    for _ in range(4):
        got = scaling_value(alpha, rank, use_rslora)
        if got == scaling:
            break
        alpha = math.nextafter(alpha, math.inf if got < scaling else -math.inf)
    return alpha


def pinned_config(config: LoraConfig, layers: list[SlotLayer]) -> LoraConfig:
    """`config` with the ranks and alphas of `layers`' specs: ``r`` / ``lora_alpha`` when all
    layers share them, else a ``rank_pattern`` / ``alpha_pattern`` entry for every layer (exact
    names, longest first, so that each layer's own entry is the first that matches it)."""
    if not layers:  # only `modules_to_save` copies
        return config
    values = {(layer.spec.r, layer.spec.alpha) for layer in layers}
    first = layers[0].spec
    changes: dict[str, Any] = {"r": first.r, "lora_alpha": first.alpha, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": first.use_rslora}
    if len(values) > 1:
        ordered = sorted(layers, key=lambda layer: len(layer.name), reverse=True)
        changes["rank_pattern"] = {re.escape(layer.name): layer.spec.r for layer in ordered}
        changes["alpha_pattern"] = {re.escape(layer.name): layer.spec.alpha for layer in ordered}
    return config.replace(**changes)


def rebuild_code(lm: "LoraModel") -> None:
    refresh_all(graph_forwards(lm.model))
