"""Layer classes that bring their own ``forward``.

A kind knows the computation of its base types (``nn.Linear``: ``F.linear(x, weight, bias)``, ...).
A subclass that overrides ``forward`` computes something else: timm's ``StdConv2d`` standardises
its weight before the convolution, ``Conv2dSame`` pads the input 'same' at run time, transformers'
scaled embeddings multiply their output. Two rules follow, and the kinds apply them:

- **Merging** folds ``delta`` into the weight, which gives ``base(x) + update(x)`` only when the
  forward is *linear in the weight*: ``forward(x)`` is the base type's op on ``T(x)`` and the
  weight, where the input transform ``T`` depends on the layer's geometry alone (never on the
  weight). fxlora cannot read that off a forward, so a class with its own forward takes no merge
  unless it is declared so with `declare_linear_forward` (timm's ``Linear``, ``Conv2dSame`` and
  ``Conv2dSameExport`` are). A standardised weight is not linear in itself: ``StdConv2d`` and
  ``ScaledStdConv2d`` are refused.
- **Convolution factors**: PEFT builds a conv layer's A and B with the layer's own class, so A
  computes what the layer computes (a 'same'-padded or standardised convolution), and a class with
  extra parameters gives its factors those parameters (``lora_A.gain`` for ``ScaledStdConv2d``).
  fxlora does the same for a class with its own forward (`own_class_factors`), with the class's
  defaults for every option besides the channels, kernel, stride, padding, groups and bias (as
  PEFT's call does), and refuses the layer (`UnsupportedTargetError`) where the class cannot be
  built that way, where the A it builds would not line up with the layer (a structural setting of
  A, such as timm's dynamic 'same' padding, differs from the layer's: PEFT crashes there), and for
  a dilated layer (PEFT's A drops the dilation, so its adapters compute an update that does not
  fold into the weight; fxlora would compute the same file differently).

A parametrized layer (``torch.nn.utils.parametrize``: weight_norm, spectral_norm) counts as the class
it had before, and its forward is that class's.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import type_before_parametrizations

from fxlora.errors import UnsupportedTargetError

__all__ = [
    "declare_linear_forward",
    "is_declared_linear",
    "forward_owner",
    "has_own_forward",
    "own_forward_merge_obstacle",
    "own_class_factors",
    "check_own_class_factors",
]

#: classes (``module.qualname``) whose own forward is linear in the weight, see the module docstring
_LINEAR_FORWARDS: set[str] = {
    "timm.layers.linear.Linear",
    "timm.layers.conv2d_same.Conv2dSame",
    "timm.layers.conv2d_same.Conv2dSameExport",
    "transformers.models.falcon.modeling_falcon.FalconLinear",  # x @ W.T (+ b)
}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def declare_linear_forward(cls: type) -> type:
    """Declare that `cls` (a subclass of a layer type fxlora adapts, with its own ``forward``)
    computes its base type's op on its weight after an input transform that does not depend on the
    weight (``Conv2dSame``: pad 'same', then ``F.conv2d``). Its layers then take merges and weighted
    combinations like their base type's. Returns `cls` (usable as a class decorator)."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"declare_linear_forward takes an nn.Module subclass, not {cls!r}")
    _LINEAR_FORWARDS.add(_qualified(cls))
    return cls


def is_declared_linear(cls: type) -> bool:
    """`cls` or the class whose forward it inherits is declared with `declare_linear_forward`."""
    return _qualified(cls) in _LINEAR_FORWARDS or _qualified(_forward_owner_of(cls)) in _LINEAR_FORWARDS


def _forward_owner_of(cls: type) -> type:
    return next((c for c in cls.__mro__ if "forward" in vars(c)), cls)


def forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` `module` runs (parametrizations looked through)."""
    return _forward_owner_of(type_before_parametrizations(module))


def has_own_forward(module: nn.Module, known: Iterable[type]) -> bool:
    """`module`'s forward is none of the `known` classes' own."""
    return forward_owner(module) not in tuple(known)


def own_forward_merge_obstacle(module: nn.Module, known: Iterable[type], op: str) -> str | None:
    """Why `module` takes no merge because of its own forward (a sentence), or None: its forward is
    one of the `known` classes' (whose op is `op`, for the message) or declared linear."""
    if not has_own_forward(module, known) or is_declared_linear(type_before_parametrizations(module)):
        return None
    owner = forward_owner(module)
    return (
        f"{owner.__name__} computes its output with its own forward, not {op} of its weight, so folding the "
        "update into the weight need not give the unmerged output (a standardised weight, as in timm's "
        "StdConv2d / ScaledStdConv2d, does not: standardisation is not linear in the weight); keep this "
        "adapter unmerged. If the forward is the op on the weight after an input transform that does not "
        "depend on the weight, declare the class with fxlora.kinds.declare_linear_forward"
    )


# ---------------------------------------------------------------------- factors of the layer's own class
_CHANNEL_SETTINGS = frozenset({"in_channels", "out_channels", "groups", "training"})
#: attributes a class's forward sets from the input it sees (a cache, not a setting), by class
_RUNTIME_STATE: dict[str, frozenset[str]] = {"timm.layers.conv2d_same.Conv2dSameExport": frozenset({"pad_input_size"})}


def _structure(module: nn.Module) -> dict[str, Any]:
    """`module`'s public settings that shape its computation's layout: everything but tensors,
    modules, callables (a forward installed on the layer), floats (numeric options such as eps, whose
    defaults PEFT's factors take) and the channel counts (which differ between a layer and its
    factors by design), and what its forward caches from its input (`_RUNTIME_STATE`)."""
    cached = _RUNTIME_STATE.get(_qualified(type_before_parametrizations(module)), frozenset())
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_")
        and k not in _CHANNEL_SETTINGS
        and k not in cached
        and not callable(v)
        and not isinstance(v, (torch.Tensor, nn.Module, float))
    }


def _refusal(where: str, module: nn.Module, why: str) -> UnsupportedTargetError:
    cls = type_before_parametrizations(module)
    return UnsupportedTargetError(
        f"cannot adapt {where} ({cls.__name__}): {cls.__name__} has its own forward, and its LoRA factors are "
        f"built with its own class, as PEFT builds them, but {why}. Exclude the layer (exclude_modules), or "
        "adapt layers of a class fxlora can build"
    )


def _build(where: str, module: nn.Module, cls: type, args: tuple, kwargs: dict, role: str) -> nn.Module:
    try:
        return cls(*args, **kwargs)
    except Exception as exc:  # any failure of a foreign constructor means: cannot be built this way
        shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        raise _refusal(where, module, f"{cls.__name__}({shown}) for its {role} factor failed: {type(exc).__name__}: {exc}") from exc


def _check_lined_up(where: str, module: nn.Module, factor: nn.Module, expected: dict[str, Any], role: str) -> None:
    found = _structure(factor)
    differ = {k: (expected.get(k), found.get(k)) for k in set(expected) | set(found) if expected.get(k) != found.get(k)}
    if differ:
        shown = "; ".join(f"{k}: layer/expected {want!r}, factor {got!r}" for k, (want, got) in sorted(differ.items()))
        raise _refusal(where, module, f"the {role} factor it builds would not line up with the layer ({shown})")


def own_class_factors(where: str, module: nn.Module, r: int, b_groups: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
    """A and B of a conv layer with its own forward, built with its own class as PEFT builds
    them: A ``cls(in, r, kernel, stride, padding, bias=False)``, B ``cls(r, out, 1, 1,
    groups=b_groups, bias=lora_bias)``. Raises `UnsupportedTargetError` (naming `where`) for a
    dilated layer (PEFT's A drops the dilation), if either cannot be built, or if A's structural
    settings differ from the layer's or B's from a 1x..x1 pointwise convolution's."""
    cls = type_before_parametrizations(module)
    dims = len(module.kernel_size)
    ones = (1,) * dims
    if tuple(module.dilation) != ones:
        raise _refusal(
            where, module,
            f"it is dilated (dilation={tuple(module.dilation)}) and PEFT builds such a layer's A without the dilation: "
            "its adapters hold an update no merge can fold into the dilated weight, and the same file would compute "
            "differently with a dilated A, so fxlora adapts neither way",
        )
    args = (module.in_channels, r, module.kernel_size, module.stride, module.padding)
    lora_a = _build(where, module, cls, args, {"bias": False}, "A")
    _check_lined_up(where, module, lora_a, _structure(module), "A")
    lora_b = _build(where, module, cls, (r, module.out_channels, ones, ones), {"groups": b_groups, "bias": lora_bias}, "B")
    pointwise = {**_structure(module), "kernel_size": ones, "stride": ones, "padding": (0,) * dims, "dilation": ones}
    _check_lined_up(where, module, lora_b, {k: v for k, v in pointwise.items() if k in _structure(lora_b)}, "B")
    return lora_a, lora_b


def _trial(where: str, module: nn.Module, factor: nn.Module, channels: int, sizes: list[int], role: str) -> None:
    x = torch.empty(1, channels, *sizes, device="meta")
    try:
        factor(x)
    except Exception as exc:  # a factor that cannot run on a valid input: refused, not left to fail later
        raise _refusal(where, module, f"its {role} factor fails on an input of size {tuple(x.shape)}: {type(exc).__name__}: {exc}") from exc


def check_own_class_factors(where: str, module: nn.Module, r: int, b_groups: int, lora_bias: bool) -> None:
    """`own_class_factors` can build the factors and they run: each is built on the meta device (no
    memory, no random numbers drawn) and called once on a meta input (a standardised B with one
    input channel per group, for one, cannot run). Raises `UnsupportedTargetError` as it does."""
    with torch.device("meta"):
        lora_a, lora_b = own_class_factors(where, module, r, b_groups, lora_bias)
    dims = len(module.kernel_size)
    a_sizes = [k + s for k, s in zip(module.kernel_size, module.stride)]
    _trial(where, module, lora_a, module.in_channels, a_sizes, "A")
    _trial(where, module, lora_b, r, [2] * dims, "B")
