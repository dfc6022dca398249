"""PEFT's ``get_layer_status()`` / ``get_model_status()``: what each adapted layer holds and the
state of the model's adapters, as PEFT's records (`LayerStatus`, `ModelStatus`: PEFT's
``TunerLayerStatus`` / ``TunerModelStatus`` fields).

Differences from PEFT, each because fxlora's state has one owner (`fxlora.model.state.AdapterState`):
layer names are the model's own (``named_modules()``), without PEFT's ``model.`` prefix; every
layer, `modules_to_save` ones included, reports the model's active adapters, enabled flag and
merged adapters, so the model's values are ``"irregular"`` only where a parameter's
``requires_grad`` was changed by hand (PEFT reports a `modules_to_save` layer without a copy
for an active adapter as having no active adapter, which makes the model's ``"irregular"``).
``module_type`` is ``"lora."`` and the adapted module's class name (PEFT's class for the common
layers: ``lora.Linear``, ``lora.Conv2d``, ``lora.Embedding``); ``quantization_backend`` names
the base layer's quantization (``"bnb 4bit"``, ``"bnb 8bit"``, ``"torchao"``; PEFT's LoRA layers
report None).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Union

import torch.nn as nn

from fxlora.core.layers import saved_meta, target_meta
from fxlora.core.trainable import lora_parameters
from fxlora.kinds.quantized import quantization_of

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.lora_model import LoraModel

__all__ = ["LayerStatus", "ModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class LayerStatus:
    """One adapted or `modules_to_save` layer (PEFT's ``TunerLayerStatus``)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class ModelStatus:
    """The model's adapters (PEFT's ``TunerModelStatus``): a value that differs between layers
    (``requires_grad``, ``quantization_backend``) is ``"irregular"``; the adapter state has one
    owner, so ``enabled``, ``active_adapters`` and ``merged_adapters`` are the model's."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _agreed(values: Iterable[Union[bool, Irregular]]) -> Union[bool, Irregular]:
    """True or False where all `values` are that, else ``"irregular"``."""
    seen = set(values)
    return seen.pop() if len(seen) == 1 and seen <= {True, False} else "irregular"


def _layer_status(lm: "LoraModel", name: str, module: nn.Module) -> Optional[LayerStatus]:
    meta, saved = target_meta(module), saved_meta(module)
    if meta is None and saved is None:
        return None
    adapters = list(meta.adapters) if meta is not None else list(saved.adapters)
    state = lm.adapter_state
    grads, devices = {}, {}
    for adapter in adapters:
        params = list(lora_parameters(module, adapter))
        grads[adapter] = _agreed(p.requires_grad for p in params)
        devices[adapter] = sorted({p.device.type for p in params})
    quantization = quantization_of(module) if meta is not None else None
    return LayerStatus(
        name=name,
        module_type=f"lora.{type(module).__name__}" if meta is not None else "ModulesToSaveWrapper",
        enabled=state.enabled,
        active_adapters=list(state.active),
        merged_adapters=[a for a in state.merged_adapters if a in adapters],
        requires_grad=grads,
        available_adapters=sorted(adapters),
        devices=devices,
        quantization_backend=None if quantization is None else quantization.backend_name,
    )


def get_layer_status(lm: "LoraModel") -> list[LayerStatus]:
    """The status of every adapted and `modules_to_save` layer, in ``named_modules()`` order."""
    found = [_layer_status(lm, name, module) for name, module in lm.model.named_modules()]
    return [status for status in found if status is not None]


def get_model_status(lm: "LoraModel") -> ModelStatus:
    """The status of the model's adapters, summed up over `get_layer_status`."""
    layers = get_layer_status(lm)
    trainable, total = lm.get_nb_trainable_parameters()
    grads, devices = collections.defaultdict(list), collections.defaultdict(set)
    for layer in layers:
        for adapter, flag in layer.requires_grad.items():
            grads[adapter].append(flag)
        for adapter, types in layer.devices.items():
            devices[adapter].update(types)
    backends = {layer.quantization_backend for layer in layers}
    return ModelStatus(
        base_model_type=type(lm.model).__name__,
        adapter_model_type="LoraModel",
        peft_types={name: "LORA" for name in lm.peft_config},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=lm.adapter_state.enabled,
        active_adapters=list(lm.adapter_state.active),
        merged_adapters=sorted(lm.adapter_state.merged_adapters),
        requires_grad={adapter: _agreed(flags) for adapter, flags in grads.items()},
        available_adapters=sorted({a for layer in layers for a in layer.available_adapters}),
        devices={adapter: sorted(types) for adapter, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
