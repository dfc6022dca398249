"""The `LayerKind` protocol and the registry of kinds (see `fxlora.kinds`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = [
    "WeightView",
    "Factors",
    "Init",
    "LayerKind",
    "KindBase",
    "register_kind",
    "kind_of",
    "is_all_linear",
    "kind_named",
    "registered_kinds",
    "supported_types",
]

#: ``LoraConfig.init_lora_weights``: True (PEFT's default init), "gaussian", False (random B too), or one
#: of `fxlora.kinds.weight_inits` ("pissa", "pissa_niter_<K>", "olora", "orthogonal")
Init = Union[bool, str]


class Factors(NamedTuple):
    """An adapter's factors as matrices: ``a`` (r, fan_in), ``b`` (fan_out, r_B)."""

    a: torch.Tensor
    b: torch.Tensor


@runtime_checkable
class LayerKind(Protocol):
    """What fxlora needs to know about one family of layer types.

    Contracts common to the methods: `module` is a layer the kind `matches`; `adapter` names an
    adapter attached to it (`fxlora.core.layers.attach_adapter`), except in `factor_shapes`,
    `check_spec` and `make_factors`, which run before it exists. No method but `write_matrices`
    changes a module.
    """

    #: registered name (unique), used in messages
    name: str
    #: the layer types it covers, for messages ("nn.Conv1d, nn.Conv2d, nn.Conv3d")
    layer_types: str
    #: ``target_modules="all-linear"`` selects it
    all_linear: bool
    #: its updates are ``x @ A.T @ B.T`` with A, B the weights of bias-free ``lora_A``/``lora_B``
    #: ``nn.Linear`` modules, so several adapters can be stacked into two matmuls
    #: (`fxlora.core.ops.stacked_linear_update`, mixed batches)
    stackable: bool
    #: the layer's output with adapters is not its base output plus an update (the update changes
    #: weights its forward reads directly, as ``nn.MultiheadAttention``'s ``in_proj_weight``): the
    #: kind computes the whole adapted call (`adapted_call`), and `update` is never asked for
    own_call: bool

    def matches(self, module: nn.Module) -> bool:
        """Whether `module` is of this kind (subclasses count as their base type)."""

    def fan_in_fan_out(self, module: nn.Module) -> Optional[bool]:
        """How the layer stores its weight, where ``LoraConfig.fan_in_fan_out`` speaks of it: True
        for (in, out), False for (out, in); None where the setting does not apply."""

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        """Raise ValueError, naming `where`, if an adapter with `spec` cannot sit on the layer
        (`fxlora.errors.UnsupportedTargetError`, a TypeError, where the layer's class cannot
        take one at all, such as a subclass whose factors cannot be built)."""

    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        """``{suffix: shape}`` of an adapter's tensors as stored in fxlora and in the adapter file
        (``"lora_A.weight"``, ``"lora_embedding_A"``, ...); their sizes sum to its parameter count."""

    def make_factors(
        self, module: nn.Module, spec: "AdapterSpec", init: Init, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Union[nn.Module, nn.Parameter]]:
        """An adapter's new modules / parameters by holder name (``"lora_A"``, ...), initialised as
        `init` says, on `device` in `dtype`. Random numbers are drawn in PEFT's order (construct A,
        construct B, then re-initialise), so seeded runs give PEFT's initial weights."""

    def update(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The adapter's unscaled update ``B(A(dropout(x)))`` for input `x`, whose base output is
        `base` (shaped like it). Traced by torch.fx into graph code (`fxlora.passes.insert_lora`)
        whose template is shared by every layer with the same `template_key`: straight-line code,
        reading the layer's tensors as attributes (helpers with logic are ``torch.fx.wrap``-ed,
        like `fxlora.core.ops`), and every Python value it bakes in part of `template_key`."""

    def adapted_call(self, module: nn.Module, args: tuple, kwargs: dict, multipliers: dict) -> Any:
        """For an `own_call` kind only: the layer's output for the call ``module(*args, **kwargs)``
        with each adapter in `multipliers` (in order) applied at its multiplier, a Python number or
        ``(scaling, gate)`` with ``gate`` a 0-d tensor (`fxlora.core.branch.own_output`). Writes
        nothing to the layer (concurrent calls must not disturb each other), and is straight-line
        code for torch.compile."""

    def lora_key(self, module: nn.Module, spec: "AdapterSpec", name: str, suffix: str, adapter: str) -> Optional[str]:
        """The fxlora state_dict key of the tensor whose PEFT file key is ``name.suffix``, where
        PEFT's rule (adapter name before the last part) cannot give it; None: that rule."""

    def mixed_batch_obstacle(self, module: nn.Module) -> Optional[str]:
        """For an `own_call` kind: why a mixed batch (``adapter_names``) cannot run through this
        layer (a sentence), or None. None promises that the layer's outputs for the entries along
        dim 0 of its first tensor input that belong to one batch row depend only on that row's
        inputs, and that every output tensor has one entry per such entry along its dim 0, so that
        the outputs of calls with one adapter each can be combined entry by entry
        (`fxlora.core.own_rows`)."""

    def reference_weight(self, module: nn.Module) -> torch.Tensor:
        """The layer's tensor whose device and dtype its adapters' tensors follow."""

    def merged_weights(self, module: nn.Module) -> tuple[str, ...]:
        """Paths (from the layer) of the weights a merge folds an update into: ``("weight",)``,
        or several (``nn.MultiheadAttention``: ``in_proj_weight``, ``out_proj.weight``)."""

    def weight_matrices(self, module: nn.Module, adapter: str) -> dict[str, Factors]:
        """The adapter's factors as matrices for each path of `merged_weights` (their product,
        laid out by `weight_from_matrix`, is that weight's update before scaling)."""

    def template_key(self, module: nn.Module) -> Hashable:
        """The layer's Python values `update` reads (its traced code depends on nothing else)."""

    def bias(self, module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
        """The adapter's B bias (``lora_bias=True``), else None."""

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        """Why no update can be folded into this layer's weights (a sentence), or None: in
        particular where the layer's forward is not linear in its weight (a subclass with its own
        forward, `fxlora.kinds.subclasses`), so the merged output would differ."""

    def as_matrices(self, module: nn.Module, adapter: str) -> Factors:
        """The adapter's factors as matrices (see the module docstring), in their own dtype."""

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        """An update given as a (fan_out, fan_in) matrix, laid out like the layer's weight
        (`fan_in_fan_out`: the layer's `fxlora.core.layers.TargetMeta` setting)."""

    def combine_obstacle(self, module: nn.Module, combination: str) -> Optional[str]:
        """Why `combination` ("cat", "linear", "svd") cannot make an adapter on this layer, or None."""

    def write_matrices(self, module: nn.Module, adapter: str, factors: Factors, bias: Optional[torch.Tensor]) -> None:
        """Copy `factors` (shaped as `as_matrices` gives them) and `bias` (None: zero) into the
        adapter's tensors, in place."""

    # DoRA (`fxlora.variants.dora`); `KindBase` refuses it, kinds that implement it override these
    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        """Why a DoRA adapter cannot sit on this layer (a sentence), or None."""

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        """The shape of a DoRA magnitude on this layer (PEFT's): one value per output feature,
        laid out to broadcast over the layer's output."""

    def dora_norm(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The L2 norm of each output feature's weights in `weight` (shaped like the layer's
        weight), shaped like `magnitude_shape`."""

    def dora_on_weight(self, module: nn.Module, values: torch.Tensor) -> torch.Tensor:
        """`values` (shaped like `magnitude_shape`) reshaped to broadcast over the layer's weight."""

    def dora_terms(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(update, weight_term)`` for input `x` whose base output is `base`: the adapter's
        unscaled update ``B(A(dropout(x)))`` (in the adapter's dtype) and the layer's output
        without its bias for the same input the update saw (``base - bias``, or, with dropout
        active, the weight term of the dropped input). Runs eagerly (reads ``module.training``)."""


class KindBase:
    """Base of the built-in kinds: the answers of a kind that has nothing special to say (not
    selected by "all-linear", not stackable, no fan_in_fan_out, no template values, no obstacle),
    and copies and pickles that are the registered object itself."""

    name: str
    all_linear = False
    stackable = False
    own_call = False

    def adapted_call(self, module: nn.Module, args: tuple, kwargs: dict, multipliers: dict) -> Any:
        raise TypeError(f"layer kind {self.name!r} adds an update to the layer's output; it has no adapted_call")

    def lora_key(self, module: nn.Module, spec: "AdapterSpec", name: str, suffix: str, adapter: str) -> Optional[str]:
        return None

    def mixed_batch_obstacle(self, module: nn.Module) -> Optional[str]:
        return None

    def reference_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight

    def merged_weights(self, module: nn.Module) -> tuple[str, ...]:
        return ("weight",)

    def weight_matrices(self, module: nn.Module, adapter: str) -> dict[str, Factors]:
        return {"weight": self.as_matrices(module, adapter)}

    def fan_in_fan_out(self, module: nn.Module) -> Optional[bool]:
        return None

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        return None

    def template_key(self, module: nn.Module) -> Hashable:
        return ()

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        return None

    def combine_obstacle(self, module: nn.Module, combination: str) -> Optional[str]:
        return None

    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        return f"fxlora implements DoRA for nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding, not for {self.layer_types}"

    def _no_dora(self, module: nn.Module, *args: object) -> Any:
        raise NotImplementedError(self.dora_obstacle(module))

    magnitude_shape = dora_norm = dora_on_weight = dora_terms = _no_dora

    def lora_weight(self, module: nn.Module, adapter: str, fan_in_fan_out: bool, dtype: torch.dtype, which: str = "weight") -> torch.Tensor:
        """The adapter's unscaled update ``B @ A`` of the layer's weight at path `which` (one of
        `merged_weights`), laid out like that weight, in `dtype`."""
        a, b = self.weight_matrices(module, adapter)[which]
        return self.weight_from_matrix(module, b.to(dtype) @ a.to(dtype), fan_in_fan_out)

    def shapes_with_magnitude(self, module: nn.Module, spec: "AdapterSpec", shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """`shapes` (`factor_shapes`) plus the DoRA magnitude's (file suffix ``lora_magnitude_vector``,
        PEFT's) when `spec` has one."""
        if spec.variant.magnitude:
            shapes["lora_magnitude_vector"] = self.magnitude_shape(module)
        return shapes

    def __reduce__(self):
        return kind_named, (self.name,)

    def __repr__(self) -> str:
        return f"<layer kind {self.name!r}>"


_REGISTRY: dict[str, LayerKind] = {}


def _protocol_members() -> list[str]:
    methods = [k for k, v in vars(LayerKind).items() if callable(v) and not k.startswith("_")]
    return [*LayerKind.__annotations__, *methods]


def register_kind(kind: LayerKind) -> LayerKind:
    """Add `kind` to the kinds fxlora adapts; returns it. Layers are matched against kinds in
    registration order, and a kind's name may be registered once."""
    if not isinstance(kind, LayerKind):
        missing = [m for m in _protocol_members() if not hasattr(kind, m)]
        raise TypeError(f"{kind!r} is not a LayerKind: it lacks {missing}")
    if kind.name in _REGISTRY:
        raise ValueError(f"a layer kind named {kind.name!r} is already registered; registered: {list(_REGISTRY)}")
    _REGISTRY[kind.name] = kind
    return kind


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind of `module`, or None when fxlora cannot adapt it."""
    for kind in _REGISTRY.values():
        if kind.matches(module):
            return kind
    return None


def is_all_linear(module: nn.Module) -> bool:
    """``target_modules="all-linear"`` selects `module` (its kind is `LayerKind.all_linear`)."""
    kind = kind_of(module)
    return kind is not None and kind.all_linear


def kind_named(name: str) -> LayerKind:
    """The registered kind called `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no layer kind named {name!r}; registered: {list(_REGISTRY)}") from None


def registered_kinds() -> tuple[LayerKind, ...]:
    return tuple(_REGISTRY.values())


def supported_types() -> str:
    """The layer types fxlora adapts, for messages."""
    return ", ".join(kind.layer_types for kind in _REGISTRY.values())


class WeightView:
    """A read-only stand-in for a module: the attributes in `overrides`, else the module's. A kind
    that computes the adapted call itself (`LayerKind.own_call`) runs the module's class forward
    on one, so the adapted weights reach that code and nothing of the module changes."""

    def __init__(self, module: nn.Module, overrides: dict[str, Any]) -> None:
        self.__dict__.update(overrides)
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)
