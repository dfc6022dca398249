"""What the kinds whose adapter is a pair of modules share: ``lora_dropout``, ``lora_A``, ``lora_B``.

Such an adapter computes ``lora_B(lora_A(lora_dropout(x)))``: A maps the layer's input to r
channels (features), B maps those to the layer's output, with an optional bias (``lora_bias``).
Init (PEFT's): A kaiming-uniform with ``a=sqrt(5)`` (``"gaussian"``: normal with std 1/r), B and
its bias zero; ``init_lora_weights=False`` keeps the modules' own random init. The kinds whose
update is a plain matrix product (``takes_weight_inits``: Linear) also take PiSSA, OLoRA, the
orthogonal init, LoftQ and CorDA (`fxlora.kinds.weight_inits`); all but orthogonal change the base
layer's weight.

A subclass says how to build the two modules (`ModulePairKind.factor_modules`) and how its weights
read as matrices; everything else is here.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.fx
import torch.nn as nn

from fxlora.dtypes import cast_like
from fxlora.kinds.registry import Factors, Init, KindBase
from fxlora.kinds.weight_inits import check_layer_data, is_weight_init, orthogonal_pair, refuse_weight_init, weight_factors

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["ModulePairKind"]

torch.fx.wrap("cast_like")  # one opaque node when `update` is traced


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device=device, dtype=dtype)``, skipped where every parameter is there already
    (the common case: a module built beside a float32 CPU layer)."""
    if all(t.device == device and t.dtype == dtype for t in itertools.chain(module.parameters(), module.buffers())):
        return module
    return module.to(device=device, dtype=dtype)


class ModulePairKind(KindBase):
    """Base of the kinds with ``lora_A`` / ``lora_B`` modules behind a ``lora_dropout``."""

    #: whether the kind takes PiSSA / OLoRA / orthogonal / LoftQ / CorDA inits (its weight is an (out, in) matrix,
    #: its factors plain matrices)
    takes_weight_inits = False

    # ---------------------------------------------------------------- to define per kind
    def factor_modules(self, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        """New (A, B) modules for an adapter with `spec`, constructed in that order."""
        raise NotImplementedError

    def a_view(self, weight: torch.Tensor) -> torch.Tensor:
        """A's weight with the rank first and the input (and kernel) after: what init and the
        matrix view see. A's weight itself unless the kind stores it otherwise."""
        return weight

    # ---------------------------------------------------------------- shared
    def make_factors(
        self, module: nn.Module, spec: "AdapterSpec", init: Init, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Union[nn.Module, nn.Parameter]]:
        self.check_spec(type(module).__name__, module, spec)
        if is_weight_init(init) or init == "eva":
            self._check_weight_init(module, spec, init)
        lora_a, lora_b = self.factor_modules(module, spec)
        if is_weight_init(init):
            self._weight_init(module, lora_a, lora_b, init, spec)
        else:
            self._init(lora_a, lora_b, init, spec.r)
        dropout = nn.Dropout(p=spec.dropout) if spec.dropout > 0 else nn.Identity()
        return {"lora_dropout": dropout, "lora_A": _placed(lora_a, device, dtype), "lora_B": _placed(lora_b, device, dtype)}

    def _init(self, lora_a: nn.Module, lora_b: nn.Module, init: Init, r: int) -> None:
        if init is False:
            return
        if init is True:
            nn.init.kaiming_uniform_(self.a_view(lora_a.weight), a=math.sqrt(5))
        elif init == "eva":  # A keeps its module's own init until initialize_lora_eva_weights (as PEFT)
            pass
        else:  # "gaussian"
            nn.init.normal_(self.a_view(lora_a.weight), std=1 / r)
        nn.init.zeros_(lora_b.weight)
        if lora_b.bias is not None:
            nn.init.zeros_(lora_b.bias)

    def _check_weight_init(self, module: nn.Module, spec: "AdapterSpec", init: str) -> None:
        """ValueError naming the layer where `init` cannot be done exactly on it (nothing is changed yet)."""
        where = type(module).__name__
        if not self.takes_weight_inits:
            refuse_weight_init(where, init)
        if init == "eva":  # A and B as for the plain init: nothing of the layer is read
            return
        init_name = str(init)
        if init == "orthogonal":
            if spec.r % 2:
                raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={spec.r} on {where}")
            return
        obstacle = self.merge_obstacle(module)
        if obstacle is not None:
            raise ValueError(
                f"init_lora_weights={init_name!r} moves part of the weight of {where} into the adapter, which needs a layer "
                f"whose output is linear in its weight: {obstacle}"
            )
        weight = module.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"init_lora_weights={init_name!r} needs a float32, float16 or bfloat16 weight, {where} has {weight.dtype}")
        if spec.r > min(weight.shape):
            raise ValueError(
                f"init_lora_weights={init_name!r} needs r <= min(out, in) = {min(weight.shape)} on {where} "
                f"(weight {tuple(weight.shape)}), got r={spec.r}"
            )
        check_layer_data(module, init, spec.r, bool(self.fan_in_fan_out(module)))

    def _weight_init(self, module: nn.Module, lora_a: nn.Module, lora_b: nn.Module, init: str, spec: "AdapterSpec") -> None:
        weight = module.weight
        with torch.no_grad():
            if init == "orthogonal":
                a, b = orthogonal_pair(spec.r, lora_a.weight.shape[1], lora_b.weight.shape[0])
            else:
                fan_in_fan_out = bool(self.fan_in_fan_out(module))
                matrix = weight.detach().to(torch.float32)
                a, b, residual = weight_factors(module, matrix.T if fan_in_fan_out else matrix, spec.r, spec.scaling, init)
                residual = residual.to(weight.dtype)
                weight.copy_(residual.T if fan_in_fan_out else residual)
            # PEFT rounds the factors through the base dtype (its adapters are first put in the
            # base layer's dtype, then up-cast), the new base weight is computed from them unrounded
            lora_a.weight.copy_(a.to(weight.dtype))
            lora_b.weight.copy_(b.to(weight.dtype))

    def update(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        lora_a = module.lora_A[adapter]
        dropped = module.lora_dropout[adapter](cast_like(x, lora_a.weight))
        return module.lora_B[adapter](self.call_a(lora_a, dropped, base))

    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        """DoRA's output formula needs the layer's output as weight term plus bias: the layers
        that take a merge (`merge_obstacle`)."""
        return self.merge_obstacle(module)

    def dora_terms(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a, dropout = module.lora_A[adapter], module.lora_dropout[adapter]
        x = cast_like(x, lora_a.weight)
        if isinstance(dropout, nn.Identity) or not module.training:  # PEFT's test
            dropped, weight_term = x, self.without_bias(module, base)
        else:
            dropped = dropout(x)
            weight_term = self.weight_term(module, dropped, module.weight.to(dropped.dtype))
        return module.lora_B[adapter](self.call_a(lora_a, dropped, base)), weight_term

    def without_bias(self, module: nn.Module, base: torch.Tensor) -> torch.Tensor:
        """`base` (the layer's output) less the layer's bias."""
        bias = getattr(module, "bias", None)
        return base if bias is None else base - bias

    def weight_term(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's output for `x` computed with `weight` and no bias."""
        raise NotImplementedError

    def call_a(self, lora_a: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """A's output for `x` (the layer's base output is `base`)."""
        return lora_a(x)

    def bias(self, module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
        return module.lora_B[adapter].bias

    def as_matrices(self, module: nn.Module, adapter: str) -> Factors:
        a = self.a_view(module.lora_A[adapter].weight)
        return Factors(a.flatten(1), module.lora_B[adapter].weight.flatten(1))

    def write_matrices(self, module: nn.Module, adapter: str, factors: Factors, bias: Optional[torch.Tensor]) -> None:
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        a_weight = self.a_view(lora_a.weight)
        a_weight.copy_(factors.a.reshape(a_weight.shape))
        lora_b.weight.copy_(factors.b.reshape(lora_b.weight.shape))
        if lora_b.bias is not None:
            lora_b.bias.copy_(bias if bias is not None else torch.zeros_like(lora_b.bias))
