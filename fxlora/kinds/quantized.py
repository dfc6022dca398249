"""Quantized weight storage: what a merge needs to know about a layer whose weight is quantized.

A quantized base layer is still a linear layer, ``y = x @ dequantize(W).T + b``, with ``W`` stored
in a few bits: an ``nn.Linear`` whose weight is a torchao tensor subclass (``Int8Tensor`` from
``Int8WeightOnlyConfig``, ``IntxUnpackedToInt8Tensor`` from ``IntxWeightOnlyConfig(torch.int4)``,
``NF4Tensor`` from ``to_nf4``, ...), or a bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` module.
The LoRA branch never reads the weight, so training, mixed batches and adapter files work as on a
plain layer. A merge cannot add to the stored integers; it does what PEFT does:

    dense = dequantize(W);  W' = quantize(round(dense + delta))

and keeps the original quantized weight (the same objects: no copy, the quantized size of the
layer) so that unmerging gives it back **bit for bit**, as long as the weight is still the one the
merge wrote. The merged weight itself is *not* exact: quantizing ``dense + delta`` rounds again, so
the merged layer's output differs from the unmerged adapted output by the quantization error
(PEFT's merge has the same error). Requantizing uses the same scheme as the original weight:

- NF4 (``to_nf4`` with the weight's block sizes), bitsandbytes int8 (row-wise absmax, fp16 input,
  as ``Int8Params`` quantizes) and bitsandbytes 4-bit (the weight's quant_type, blocksize,
  compress_statistics and storage dtype): known from the weight itself;
- any other torchao tensor: only with the torchao config the base was quantized with, declared
  by `requantize_with` (torchao tensors do not record their config); without it merging refuses
  (`fxlora.errors.MergeError`) and names what works: `requantize_with`, or exporting merged weights
  (`save_merged` / `merged_state_dict`), which holds the dequantized merged weights and needs no
  requantizing.

Detection never imports torchao or bitsandbytes (a model without them pays nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

__all__ = ["Quantization", "QuantizedWeight", "quantization_of", "requantize_with", "counted_elements", "eval_forward_changes_layer", "weight_shape"]

#: module attribute holding the torchao config `requantize_with` declared
_CONFIG_ATTR = "fxlora_requantize_config"


@dataclass
class QuantizedWeight:
    """A layer's quantized weight as a merge found it (`Quantization.keep`), to be put back."""

    weight: nn.Parameter
    extra: dict[str, Any]


class Quantization:
    """One way of storing a layer's weight quantized (see the module docstring)."""

    #: the backend's name as PEFT's status records write it (``get_layer_status``)
    backend_name: str = ""

    #: for messages: "torchao Int8Tensor", "bitsandbytes Linear4bit (nf4)", ...
    def describe(self, module: nn.Module) -> str:
        raise NotImplementedError

    def dense(self, module: nn.Module) -> torch.Tensor:
        """The layer's weight dequantized: a new plain tensor shaped (out, in)."""
        raise NotImplementedError

    def shape(self, module: nn.Module) -> torch.Size:
        """The shape of the weight the layer computes with, (out, in) (not its packed storage's)."""
        return module.weight.shape

    def requantize_obstacle(self, module: nn.Module) -> Optional[str]:
        """Why the layer's weight cannot be requantized after a merge (a sentence), or None."""
        return None

    def quantized(self, module: nn.Module, dense: torch.Tensor) -> QuantizedWeight:
        """`dense` quantized like the layer's weight, ready for `put`; `module` is not changed."""
        raise NotImplementedError

    def keep(self, module: nn.Module) -> QuantizedWeight:
        """The layer's weight as it is (the objects, not copies), for `put`."""
        return QuantizedWeight(module.weight, {})

    def put(self, module: nn.Module, kept: QuantizedWeight) -> None:
        """Make `kept` the layer's weight."""
        module.weight = kept.weight

    def holds(self, module: nn.Module, kept: QuantizedWeight) -> bool:
        """Whether the layer's weight is still `kept` (nothing replaced it since)."""
        return module.weight is kept.weight


def _is_torchao(weight: object) -> bool:
    return type(weight).__module__.startswith("torchao.")


def _bnb_class(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes.") and cls.__name__ in ("Linear8bitLt", "Linear4bit"):
            return cls.__name__
    return None


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _Torchao(Quantization):
    """A torchao tensor subclass as ``nn.Linear.weight`` (``quantize_``): dequantized with its own
    ``dequantize()``, requantized by ``quantize_`` with the config `requantize_with` declared."""

    backend_name = "torchao"

    def describe(self, module: nn.Module) -> str:
        return f"torchao {type(module.weight).__name__}"

    def dense(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    def requantize_obstacle(self, module: nn.Module) -> Optional[str]:
        if getattr(module, _CONFIG_ATTR, None) is not None:
            return None
        return (
            f"its weight is a {self.describe(module)}, which records no torchao config to requantize the merged "
            "weight with; declare the config the base was quantized with (fxlora.kinds.quantized.requantize_with("
            "model, config), e.g. Int8WeightOnlyConfig()), or keep the adapter unmerged, or export the merged "
            "weights dequantized (LoraModel.save_merged / merged_state_dict), which needs no requantizing"
        )

    def quantized(self, module: nn.Module, dense: torch.Tensor) -> QuantizedWeight:
        from torchao.quantization import quantize_

        holder = nn.Linear(1, 1, bias=False, device="meta")
        holder.weight = _frozen(dense)
        quantize_(holder, getattr(module, _CONFIG_ATTR))
        if type(holder.weight) is not type(module.weight):
            raise TypeError(
                f"the torchao config declared with requantize_with ({type(getattr(module, _CONFIG_ATTR)).__name__}) "
                f"quantizes to {type(holder.weight).__name__}, but the layer's weight is a {type(module.weight).__name__}: "
                "declare the config the base was quantized with"
            )
        return QuantizedWeight(holder.weight, {})


class _NF4(_Torchao):
    """torchao's ``NF4Tensor`` (``to_nf4``, QLoRA's NormalFloat4): requantized by ``to_nf4`` with
    the weight's own block sizes."""

    def dense(self, module: nn.Module) -> torch.Tensor:
        return module.weight.get_original_weight()

    def requantize_obstacle(self, module: nn.Module) -> Optional[str]:
        return None

    def quantized(self, module: nn.Module, dense: torch.Tensor) -> QuantizedWeight:
        from torchao.quantization import to_nf4

        weight = module.weight
        return QuantizedWeight(_frozen(to_nf4(dense.to(weight.dtype), weight.block_size, weight.scaler_block_size)), {})


class _Bnb8bit(Quantization):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8, inference weights ``has_fp16_weights=False``): int8
    rows with one absmax scale each (``SCB``), held by the weight until the first forward moves
    them to the layer's ``state``."""

    backend_name = "bnb 8bit"

    def describe(self, module: nn.Module) -> str:
        return "bitsandbytes Linear8bitLt"

    def _scales(self, module: nn.Module) -> torch.Tensor:
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        if scb is None:
            raise TypeError(f"the {self.describe(module)} weight holds no scales (SCB): it was never quantized")
        return scb

    def dense(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.functional.int8_vectorwise_dequant(module.weight.data, self._scales(module))

    def requantize_obstacle(self, module: nn.Module) -> Optional[str]:
        if module.weight.has_fp16_weights or module.weight.dtype != torch.int8:
            return f"its {self.describe(module)} weight is not stored quantized (has_fp16_weights=True): it is a plain weight fxlora does not fold into"
        return None

    def quantized(self, module: nn.Module, dense: torch.Tensor) -> QuantizedWeight:
        import bitsandbytes as bnb

        device = module.weight.device
        weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        return QuantizedWeight(weight, {"CB": weight.CB, "SCB": weight.SCB, "state": (None, None)})

    def keep(self, module: nn.Module) -> QuantizedWeight:
        weight = module.weight
        return QuantizedWeight(weight, {"CB": weight.CB, "SCB": weight.SCB, "state": (module.state.CB, module.state.SCB)})

    def put(self, module: nn.Module, kept: QuantizedWeight) -> None:
        module.weight = kept.weight
        kept.weight.CB, kept.weight.SCB = kept.extra["CB"], kept.extra["SCB"]
        module.state.reset_grads()
        module.state.CB, module.state.SCB = kept.extra["state"]


class _Bnb4bit(Quantization):
    """bitsandbytes ``Linear4bit`` (NF4 / FP4, QLoRA): blocks of 4-bit codes with their quant state."""

    backend_name = "bnb 4bit"

    def describe(self, module: nn.Module) -> str:
        return f"bitsandbytes Linear4bit ({module.weight.quant_type})"

    def shape(self, module: nn.Module) -> torch.Size:
        return torch.Size(module.weight.quant_state.shape)

    def dense(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise TypeError(
                f"the {self.describe(module)} weight was repacked for bitsandbytes' CPU inference kernel (an eval-mode "
                "forward on CPU does this), which bnb.functional.dequantize_4bit does not read; fxlora cannot "
                "dequantize it. Merge or export before running it in eval mode on CPU"
            )
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)

    def requantize_obstacle(self, module: nn.Module) -> Optional[str]:
        if module.weight.quant_state is None:
            return f"its {self.describe(module)} weight is not quantized yet (bitsandbytes quantizes it when it is moved to a device)"
        return None

    def quantized(self, module: nn.Module, dense: torch.Tensor) -> QuantizedWeight:
        import bitsandbytes as bnb

        old = module.weight
        weight = bnb.nn.Params4bit(
            dense.to(old.quant_state.dtype).to("cpu"),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        ).to(old.device)
        return QuantizedWeight(weight, {})


_TORCHAO, _NF4_STORAGE, _BNB8, _BNB4 = _Torchao(), _NF4(), _Bnb8bit(), _Bnb4bit()


def quantization_of(module: nn.Module) -> Optional[Quantization]:
    """How `module`'s weight is stored quantized (see the module docstring), or None for a layer
    that is not a quantized linear layer."""
    bnb = _bnb_class(module)
    if bnb is not None:
        return _BNB8 if bnb == "Linear8bitLt" else _BNB4
    if not isinstance(module, nn.Linear):
        return None
    weight = module._parameters.get("weight")
    if weight is None or not _is_torchao(weight):
        return None
    return _NF4_STORAGE if type(weight).__name__ == "NF4Tensor" else _TORCHAO


def requantize_with(model: nn.Module, config: Any, where: Optional[Callable[[str, nn.Module], bool]] = None) -> list[str]:
    """Declare `config` (a torchao config such as ``Int8WeightOnlyConfig()``, the one the base was
    quantized with) as the way to requantize merged weights of `model`'s torchao-quantized linear
    layers (those `where(name, module)` accepts, default all); returns their names. For a
    transformers model loaded with ``TorchAoConfig`` the config is
    ``model.config.quantization_config.quant_type``. Call it before or after `fxlora.transform`."""
    named = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(quantization_of(module), _Torchao) and not isinstance(quantization_of(module), _NF4)
        and (where is None or where(name, module))
    ]
    for _, module in named:
        setattr(module, _CONFIG_ATTR, config)
    return [name for name, _ in named]


def counted_elements(param: torch.Tensor) -> int:
    """How many parameters `param` counts for in a parameter report: its elements, except for a
    bitsandbytes 4-bit weight, whose storage packs two values per byte (PEFT's count: elements x 2
    x the storage element size)."""
    if type(param).__name__ == "Params4bit" and type(param).__module__.startswith("bitsandbytes."):
        return param.numel() * 2 * param.element_size()
    return param.numel()


def eval_forward_changes_layer(module: nn.Module) -> bool:
    """Whether an eval-mode forward without gradients changes `module` (a bitsandbytes layer: on
    CPU, ``Linear4bit`` repacks its weight for its inference kernel, which computes differently)."""
    return _bnb_class(module) is not None


def weight_shape(module: nn.Module, which: str = "weight") -> torch.Size:
    """The shape of the layer's tensor at path `which` as the layer computes with it: a quantized
    weight's (out, in), not its packed storage's."""
    quantization = quantization_of(module) if which == "weight" else None
    if quantization is None:
        owner, _, leaf = which.rpartition(".")
        return getattr(module.get_submodule(owner), leaf).shape
    return quantization.shape(module)
