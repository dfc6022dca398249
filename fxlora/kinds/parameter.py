"""The ``parameter`` kind: LoRA on ``nn.Parameter``s of a module (``LoraConfig.target_parameters``),
PEFT's ``lora.ParamWrapper``: fused MoE experts (``experts.gate_up_proj`` (E, out, in)), routers
(``gate.weight``), or any 2-D / 3-D parameter a module's forward reads directly.

An adapter on a module holds, for each targeted parameter ``p`` (in the module's registration
order), ``lora_A.<adapter>.<p>`` = ``nn.Linear(in, r * E)`` and ``lora_B.<adapter>.<p>`` =
``nn.Linear(r * E, out)`` (bias-free), PEFT's shapes: E experts (1 for a 2-D parameter); a 3-D
parameter (E, d1, d2) has ``in = d2``, ``out = d1``, unless the module says ``is_transposed``
(transformers' experts flag), then ``in = d1``, ``out = d2``. Expert ``e``'s update is
``B[:, e::E] @ A[e*r:(e+1)*r]`` (PEFT's reshapes: A's rows grouped by expert, B's columns
interleaved), laid out like the parameter, times the parameter's own scaling (its rank and alpha
follow ``rank_pattern`` / ``alpha_pattern`` on the parameter's full name, as in PEFT).

The output is not the base output plus an update, so the kind computes the adapted call itself
(`LayerKind.own_call`): the module's class forward run on a read-only view whose targeted
parameters are ``W + delta`` (PEFT's parametrization; a single adapter on a 3-D parameter folds in
with one ``baddbmm``, as PEFT's ``_LoraFactorsProxy``), so outputs equal PEFT's and torch.compile
traces it without a graph break. The module itself is never written.

File keys (PEFT's nesting: one ``ParamWrapper`` per parameter, the later-registered one outside):
for a module with targeted parameters p1..pk, ``p_i``'s factors are
``<name>.{"base_layer." * (k - i)}lora_A.weight`` / ``lora_B.weight``.

Mixed batches (``adapter_names``; PEFT refuses them on target_parameters): a weight cannot differ
per row, so the module is called once per adapter some row uses and once without adapters, and each
output entry along dim 0 is taken from its row's call (`fxlora.core.own_rows`). A sparse-MoE block
hands its router and experts tokens, ``hidden_states.view(-1, hidden)``: graph code tells the module
the batch-first tensor its input was reshaped from, which fixes the row of every token exactly
(`fxlora.passes.rows_source`); without that (an eager call, a permute on the way) a module whose
dim 0 is not the batch is refused, as are mixed batches while an adapter is merged.

Refused (`UnsupportedTargetError` / ValueError, as PEFT refuses them): ``lora_dropout`` (the input of
the update cannot be factored out), ``lora_bias``, DoRA, parameters that are not 2-D or 3-D, and
``add_weighted_adapter``. All adapters on one module target the same
parameters (PEFT's rule). The per-parameter scalings are applied here, so the adapter's
`AdapterSpec.scaling` is 1.0 (`ParameterSpec`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from fxlora.errors import UnsupportedTargetError
from fxlora.kinds.registry import Factors, Init, KindBase, WeightView, register_kind

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["PARAMETER", "ParamTarget", "geometry", "parameter_file_suffix"]

#: the record `fxlora.core.layers.attach_adapter` keeps on an adapted module (``META_ATTR``)
_RECORD = "_fxlora"


class ParamTarget(NamedTuple):
    """One targeted parameter of a module: its name there, its rank, alpha and scaling."""

    name: str
    r: int
    alpha: float
    scaling: float


class Geometry(NamedTuple):
    """How PEFT reads a targeted parameter: ``experts`` (1 for 2-D), ``in_features``,
    ``out_features``, and whether it is stored (E, out, in) (``out_first``)."""

    experts: int
    in_features: int
    out_features: int
    out_first: bool


def geometry(module: nn.Module, name: str) -> Geometry:
    """PEFT's reading of parameter `name` of `module` (ValueError unless it is 2-D or 3-D)."""
    shape = tuple(getattr(module, name).shape)
    if len(shape) == 2:
        return Geometry(1, shape[1], shape[0], True)
    if len(shape) == 3:
        if getattr(module, "is_transposed", False):  # transformers experts stored (E, in, out)
            return Geometry(shape[0], shape[1], shape[2], False)
        return Geometry(shape[0], shape[2], shape[1], True)
    raise ValueError(f"parameter {name!r} of {type(module).__name__} is {len(shape)}-D {shape}; LoRA takes 2-D and 3-D parameters only (as PEFT)")


def parameter_file_suffix(position: int, count: int, holder: str) -> str:
    """The file suffix of the factor `holder` (``"lora_A"``) of the parameter at `position`
    (0-based, registration order) among the `count` targeted parameters of a module (PEFT nests one
    wrapper per parameter, the last one outermost)."""
    return "base_layer." * (count - 1 - position) + f"{holder}.weight"


def _params(spec: "AdapterSpec") -> tuple[ParamTarget, ...]:
    return spec.params  # a `fxlora.planning.parameters.ParameterSpec`


def _specs(module: nn.Module) -> dict:
    return vars(module)[_RECORD].adapters


def _product(geo: Geometry, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The unscaled update of a parameter read as `geo` from factor weights `a` (r E, in), `b`
    (out, r E), laid out like the parameter (PEFT's einsum)."""
    if geo.experts == 1:
        return b @ a
    a3 = a.reshape(geo.experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, geo.experts)
    return torch.einsum("ore,eri->eoi" if geo.out_first else "ore,eri->eio", b3, a3)


def _fold_one(weight: torch.Tensor, geo: Geometry, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``weight + alpha * delta`` for one adapter on a 3-D parameter (read as `geo`) in one
    ``baddbmm`` in the weight's dtype (PEFT's ``_LoraFactorsProxy``)."""
    a3 = a.reshape(geo.experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, geo.experts).permute(2, 0, 1)
    lhs, rhs = (b3, a3) if geo.out_first else (a3.transpose(-2, -1), b3.transpose(-2, -1))
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=alpha)


class ParameterKind(KindBase):
    name = "parameter"
    layer_types = "nn.Parameter (target_parameters)"
    own_call = True

    def matches(self, module: nn.Module) -> bool:
        return False  # never chosen by a module's type: `target_parameters` names its targets

    def reference_weight(self, module: nn.Module) -> torch.Tensor:
        return next(module.parameters(recurse=False))

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        for option, value, off in (("lora_dropout", spec.dropout, "0.0"), ("lora_bias", spec.lora_bias, "False")):
            if value:
                raise ValueError(
                    f"cannot adapt the parameters of {where} ({type(module).__name__}) with {option}={value!r}: "
                    f"target_parameters fold the update into the parameter, which has no place for "
                    f"{option.replace('lora_', 'a LoRA ')} (PEFT refuses it too); use {option}={off}, or a separate adapter"
                )
        if spec.variant.magnitude:
            raise UnsupportedTargetError(
                f"use_dora=True cannot adapt the parameters of {where} ({type(module).__name__}): DoRA is not "
                "defined for target_parameters (PEFT refuses it too); use plain LoRA"
            )
        for target in _params(spec):
            geometry(module, target.name)

    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        params = _params(spec)
        shapes = {}
        for i, target in enumerate(params):
            geo = geometry(module, target.name)
            rank = target.r * geo.experts
            shapes[parameter_file_suffix(i, len(params), "lora_A")] = (rank, geo.in_features)
            shapes[parameter_file_suffix(i, len(params), "lora_B")] = (geo.out_features, rank)
        return shapes

    def lora_key(self, module: nn.Module, spec: "AdapterSpec", name: str, suffix: str, adapter: str) -> str:
        """The fxlora state_dict key of the tensor whose file key is ``name.suffix``."""
        params = _params(spec)
        depth = suffix.count("base_layer.")
        holder = suffix.rpartition(".")[0].rpartition(".")[2]
        return f"{name}.{holder}.{adapter}.{params[len(params) - 1 - depth].name}.weight"

    def make_factors(
        self, module: nn.Module, spec: "AdapterSpec", init: Init, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Union[nn.Module, nn.Parameter]]:
        self.check_spec(type(module).__name__, module, spec)
        if init not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={init!r} cannot initialise target_parameters on {type(module).__name__}; "
                "use True, False or 'gaussian'"
            )
        holders_a, holders_b = nn.ModuleDict(), nn.ModuleDict()
        for target in _params(spec):  # PEFT's order: A, B, init, per parameter
            geo = geometry(module, target.name)
            rank = target.r * geo.experts
            lora_a, lora_b = nn.Linear(geo.in_features, rank, bias=False), nn.Linear(rank, geo.out_features, bias=False)
            if init is not False:
                if init is True:
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a.weight, std=1 / target.r)
                nn.init.zeros_(lora_b.weight)
            holders_a[target.name], holders_b[target.name] = lora_a, lora_b
        own = self.reference_weight(module).dtype  # PEFT rounds new factors through the parameter's dtype
        rounded = [h.to(dtype=own) if own.is_floating_point else h for h in (holders_a, holders_b)]
        return {"lora_A": rounded[0].to(device=device, dtype=dtype), "lora_B": rounded[1].to(device=device, dtype=dtype)}

    def update(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        raise TypeError("a target parameter has no additive update: its kind computes the adapted call (adapted_call)")

    def adapted_call(self, module: nn.Module, args: tuple, kwargs: dict, multipliers: dict[str, Any]) -> Any:
        specs = _specs(module)
        overrides = {}
        for name in self.merged_weights(module):
            weight, geo = getattr(module, name), geometry(module, name)
            present = [(a, m, t) for a, m in multipliers.items() for t in _params(specs[a]) if t.name == name]
            if len(present) == 1 and not isinstance(present[0][1], tuple) and geo.experts > 1:
                adapter, multiplier, target = present[0]
                holder_a, holder_b = module.lora_A[adapter][name], module.lora_B[adapter][name]
                overrides[name] = _fold_one(weight, geo, holder_a.weight, holder_b.weight, target.scaling * multiplier)
                continue
            total = None
            for adapter, multiplier, target in present:
                delta = _product(geo, module.lora_A[adapter][name].weight, module.lora_B[adapter][name].weight)
                if isinstance(multiplier, tuple):
                    scaling, gate = multiplier
                    delta = delta * (target.scaling * scaling) * gate.to(delta.dtype)
                else:
                    delta = delta * (target.scaling * multiplier)
                delta = delta.to(weight.dtype)
                total = delta if total is None else total + delta
            overrides[name] = weight if total is None else weight + total
        return type(module).forward(WeightView(module, overrides), *args, **kwargs)

    def merged_weights(self, module: nn.Module) -> tuple[str, ...]:
        specs = _specs(module)
        return tuple(t.name for t in _params(next(iter(specs.values())))) if specs else ()

    def weight_matrices(self, module: nn.Module, adapter: str) -> dict[str, Factors]:
        return {
            t.name: Factors(module.lora_A[adapter][t.name].weight, module.lora_B[adapter][t.name].weight)
            for t in _params(_specs(module)[adapter])
        }

    def lora_weight(self, module: nn.Module, adapter: str, fan_in_fan_out: bool, dtype: torch.dtype, which: str = "weight") -> torch.Tensor:
        """The update of parameter `which` laid out like it, *scaled* by the parameter's own scaling
        (the adapter's `AdapterSpec.scaling` is 1.0), computed in `dtype`."""
        target = next(t for t in _params(_specs(module)[adapter]) if t.name == which)
        a, b = self.weight_matrices(module, adapter)[which]
        return _product(geometry(module, which), a.to(dtype), b.to(dtype)) * target.scaling

    def as_matrices(self, module: nn.Module, adapter: str) -> Factors:
        raise TypeError("an adapter on target_parameters is one factor pair per parameter: use weight_matrices")

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        raise TypeError("an adapter on target_parameters lays out its updates itself (lora_weight)")

    def write_matrices(self, module: nn.Module, adapter: str, factors: Factors, bias: Optional[torch.Tensor]) -> None:
        raise TypeError("add_weighted_adapter does not combine adapters on target_parameters (nor does PEFT)")

    def bias(self, module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
        return None

    def combine_obstacle(self, module: nn.Module, combination: str) -> Optional[str]:
        return "add_weighted_adapter does not combine adapters on target_parameters (PEFT refuses them too)"

    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        return "DoRA is not defined for target_parameters (PEFT refuses it too)"


PARAMETER = register_kind(ParameterKind())
