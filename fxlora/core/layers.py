"""Runtime LoRA state attached to the user's own modules.

fxlora never replaces a target module: it attaches the adapter's modules *under* it, so every
module of the original model keeps its type, its qualified name and its ``state_dict()`` keys.
For an adapter named ``default`` on a target ``seq.0`` the naming is::

    seq.0.weight, seq.0.bias                 the base layer, untouched
    seq.0.lora_A.default.weight              A: (r, in) for Linear; (r, in, *kernel) for ConvNd;
                                             (in, r, *kernel) for ConvTransposeNd
    seq.0.lora_B.default.weight              B: (out, r) for Linear; (out, r/groups, 1, ..) for ConvNd
                                             and ConvTransposeNd (each layer kind's: `fxlora.kinds`)
    seq.0.lora_B.default.bias                only with lora_bias=True
    seq.0.lora_dropout.default               nn.Dropout(p), or nn.Identity() when p = 0
    emb.lora_embedding_A.default             Embedding: A (r, num_embeddings)
    emb.lora_embedding_B.default             Embedding: B (embedding_dim, r)
    seq.0.lora_magnitude_vector.default.weight   DoRA (use_dora): the magnitude, one value per output
                                             feature (`fxlora.variants.dora`; shape: the kind's)
    head.modules_to_save.default.weight      trainable copy of a `modules_to_save` module
    attn.out_proj.lora_A.default.weight      nn.MultiheadAttention: its out_proj's factors hang under
                                             its out_proj (the layer's own lora_A / lora_B: in_proj)

These are the names PEFT gives its LoRA tensors, without PEFT's ``base_layer`` indirection.
Nothing else is attached: an adapter's scaling (alpha/r) is its `AdapterSpec`'s, a Python number
(a hot-swap slot's spec also holds it as a 0-d tensor, `AdapterSpec.scaling_cell`, kept equal to
it by `fxlora.model.hotswap`), and the adapter gates are the call's (`fxlora.core.gates.GateState`),
never a tensor stored on a module (so nothing derived can hold stale or uninitialised values, e.g.
after meta-device init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn as nn

from fxlora.boundary import execution_device
from fxlora.dtypes import adapter_dtype, compute_dtype
from fxlora.errors import UnsupportedTargetError
from fxlora.config import scaling_value
from fxlora.variants import PLAIN, LoraVariant
from fxlora.variants.dora import Magnitude

if TYPE_CHECKING:
    from fxlora.kinds import LayerKind

__all__ = [
    "LORA_CHILDREN",
    "BASE_ONLY",
    "GUARD_IDLE",
    "AdapterSpec",
    "TargetMeta",
    "SavedMeta",
        "attach_adapter",
    "attach_saved_copy",
    "detach_all",
    "target_meta",
    "saved_meta",
    "saved_copy_choice",
    "fxlora_internal_names",
    "adapter_holders",
    "check_adapter_name",
    "ADAPTER_NAME_RULE",
]

#: Children fxlora adds to a module; nothing else of the user's tree is touched.
LORA_CHILDREN = (
    "lora_A",
    "lora_B",
    "lora_dropout",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
)
META_ATTR = "_fxlora"
#: keyword with which graph code calls an adapted module for its base output alone (the graph
#: computes the branch itself); every other call of the module computes with LoRA
BASE_ONLY = "_fxlora_base_only"
#: keyword with which gated evaluation code calls an adapted module for its output with LoRA under
#: a run-time test of its gates (`fxlora.passes.guard_idle`): idle branches cost nothing compiled
GUARD_IDLE = "_fxlora_guard_idle"
#: keyword with which compiled evaluation code calls a graph root of its own (a repeated block,
#: `fxlora.planning.roots`) inside one branch of its ``torch.cond`` (`fxlora.runtime.idle`): the
#: value says which of the block's codes that branch runs, so that the block adds no ``torch.cond``
NESTED_CODE = "_fxlora_code"
GATED_CODE, IDLE_CODE = "gated", "idle"


@dataclass
class AdapterSpec:
    """One adapter on one layer: its rank, alpha, the options that shape the branch, and its
    variant of the LoRA update (`fxlora.variants`)."""

    r: int
    alpha: float
    use_rslora: bool = False
    lora_bias: bool = False
    dropout: float = 0.0
    variant: LoraVariant = PLAIN
    #: a hot-swap slot's scaling as a 0-d float32 tensor (`fxlora.model.hotswap`), always equal to
    #: `scaling`: gated code (what torch.compile sees) reads it instead of the number, so that a hot
    #: swap changes it in place without recompiling. None: the number is used everywhere. Owned by
    #: one layer's spec: set by assignment, and a copy made with ``dataclasses.replace`` has None.
    scaling_cell: Optional[torch.Tensor] = field(default=None, init=False, compare=False, repr=False)

    @property
    def scaling(self) -> float:
        return scaling_value(self.alpha, self.r, self.use_rslora)


@dataclass
class TargetMeta:
    """Plain-Python record on an adapted module (``module._fxlora``)."""

    kind: "LayerKind"  # `fxlora.kinds`: everything that depends on the layer's type
    fan_in_fan_out: bool
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)


@dataclass
class SavedMeta:
    """Record on a `modules_to_save` module: the adapters that own a trainable copy of it."""

    adapters: list[str] = field(default_factory=list)


# --------------------------------------------------------------------- lookups
def target_meta(module: nn.Module) -> Optional[TargetMeta]:
    meta = module.__dict__.get(META_ATTR)
    return meta if isinstance(meta, TargetMeta) else None


def saved_meta(module: nn.Module) -> Optional[SavedMeta]:
    meta = module.__dict__.get(META_ATTR)
    return meta if isinstance(meta, SavedMeta) else None


def adapter_holders(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path from `module`, holder)`` for every fxlora child (`LORA_CHILDREN`) of an adapted or
    saved module: under the module itself, or under one of its direct children that is neither
    (a kind may hang factors there: ``nn.MultiheadAttention``'s ``out_proj.lora_A``)."""
    found = [(name, child) for name, child in module._modules.items() if name in LORA_CHILDREN and child is not None]
    for child_name, child in module._modules.items():
        if child is None or child_name in LORA_CHILDREN or META_ATTR in child.__dict__:
            continue
        found += [(f"{child_name}.{name}", sub) for name, sub in child._modules.items() if name in LORA_CHILDREN and sub is not None]
    return found


def fxlora_internal_names(model: nn.Module) -> set[str]:
    """Names of every module fxlora added under `model` (adapter modules, copies, gates)."""
    internal: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if META_ATTR not in module.__dict__:
            continue
        prefix = f"{name}." if name else ""
        for path, child in adapter_holders(module):
            internal.update(n for n, _ in child.named_modules(prefix=prefix + path, remove_duplicate=False))
    return internal


#: what `check_adapter_name` accepts, as its errors say it
ADAPTER_NAME_RULE = (
    "an adapter name is a non-empty str that keys nn.ModuleDicts (no '.', not an nn.Module attribute "
    "such as 'forward' or 'training'), names the adapter's directory when saved (no '/', '\\\\' or NUL, "
    "at most 255 bytes in UTF-8), and is not '__base__' (the base model in a mixed batch)"
)


def check_adapter_name(name: object) -> str:
    """`name` if it is a valid adapter name (`ADAPTER_NAME_RULE`), else a `ValueError` naming it and
    the rule. Any other str works everywhere: graph code writes names safely (`fxlora.runtime.codegen`)."""
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(f"invalid adapter name {name!r}: {problem}; {ADAPTER_NAME_RULE}")
    return name


def _name_problem(name: object) -> Optional[str]:
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a str"
    if not name:
        return "it is empty"
    if name == "__base__":
        return "'__base__' is reserved"
    bad = [ch for ch in (".", "/", "\\", "\0") if ch in name]
    if bad:
        return f"it contains {bad[0]!r}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it cannot be encoded in UTF-8 (file keys and directory names are UTF-8)"
    if size > 255:
        return f"it is {size} bytes long in UTF-8"
    if any(hasattr(holder, name) for holder in (nn.ModuleDict(), nn.ParameterDict())):
        return "it clashes with an nn.Module attribute"
    return None


# --------------------------------------------------------------------- creation
def _child_dict(module: nn.Module, name: str, factory: type) -> nn.Module:
    """`module`'s child `name`, made with `factory` (in `module`'s mode) if it has none yet."""
    child = module._modules.get(name)
    if child is None:
        child = _in_mode_of(module, factory())
        module.add_module(name, child)
    return child


def _in_mode_of(layer: nn.Module, new: nn.Module) -> nn.Module:
    """`new` (and everything under it) in `layer`'s mode, train or eval: a module attached to an
    eval layer must not run dropout (``nn.Module`` is made in train mode)."""
    return new.train(layer.training)


def adapter_device(module: nn.Module, weight: torch.Tensor) -> torch.device:
    """Where a layer's adapter weights live: on its weight's device, except for a layer whose
    weight accelerate offloads (kept on the meta device, loaded by the hook accelerate put on the
    layer for each call and dropped after it). accelerate knows nothing of the adapter, which then
    lives on the hook's execution device."""
    if weight.device.type == "meta":
        device = execution_device(module)
        if device is not None:
            return device
    return weight.device


def attach_adapter(
    module: nn.Module,
    adapter: str,
    spec: AdapterSpec,
    init: Union[bool, str],
    kind: "LayerKind",
    fan_in_fan_out: Optional[bool] = None,
) -> TargetMeta:
    """Create adapter `adapter` on the layer `module`, of the kind `kind` (`fxlora.kinds.kind_of`),
    and initialise it (`LayerKind.make_factors`: random numbers in PEFT's order, so a seeded run
    gives PEFT's initial weights). Adapter weights are placed on the base weight's device, in
    `adapter_dtype`, in `module`'s mode (train or eval). Returns the module's `TargetMeta`.
    """
    if fan_in_fan_out is None:
        fan_in_fan_out = bool(kind.fan_in_fan_out(module))  # the layer's own layout
    meta = target_meta(module) or TargetMeta(kind=kind, fan_in_fan_out=fan_in_fan_out)
    if adapter in meta.adapters:
        raise ValueError(f"adapter {adapter!r} already exists on {type(module).__name__}")
    weight = kind.reference_weight(module)
    device = adapter_device(module, weight)
    if spec.variant.magnitude and weight.is_meta and device.type != "meta":
        raise UnsupportedTargetError(
            f"use_dora=True cannot adapt this {type(module).__name__}: its weight is offloaded (on the meta device, "
            "loaded per call by accelerate), and a DoRA magnitude starts from the weight's norm; load the model "
            "without offloading, or use plain LoRA (use_dora=False)"
        )
    made = kind.make_factors(module, spec, init, device=device, dtype=adapter_dtype(weight))
    for holder, value in made.items():
        if isinstance(value, nn.Module):
            value = _in_mode_of(module, value)
        owner_path, _, holder_name = holder.rpartition(".")  # "out_proj.lora_A": under the layer's out_proj
        owner = module.get_submodule(owner_path)
        _child_dict(owner, holder_name, nn.ParameterDict if isinstance(value, nn.Parameter) else nn.ModuleDict)[adapter] = value

    if spec.variant.magnitude:
        magnitude = _in_mode_of(module, Magnitude(_initial_magnitude(module, adapter, spec, kind, fan_in_fan_out)))
        _child_dict(module, "lora_magnitude_vector", nn.ModuleDict)[adapter] = magnitude
    meta.adapters[adapter] = spec
    module.__dict__[META_ATTR] = meta
    return meta


def _initial_magnitude(module: nn.Module, adapter: str, spec: AdapterSpec, kind: "LayerKind", fan_in_fan_out: bool) -> torch.Tensor:
    """A DoRA magnitude's start (PEFT's): ``||W + scaling * B @ A||`` per output feature, in the
    compute dtype (`fxlora.dtypes.compute_dtype`), stored in the adapter's dtype."""
    made = module.lora_A[adapter].weight if "lora_A" in module._modules else module.lora_embedding_A[adapter]
    with torch.no_grad():
        dtype = compute_dtype(module.weight, made)
        summed = module.weight.to(dtype) + spec.scaling * kind.lora_weight(module, adapter, fan_in_fan_out, dtype)
        return kind.dora_norm(module, summed).to(made.dtype)


def attach_saved_copy(module: nn.Module, adapter: str) -> None:
    """Give `module` (a `modules_to_save` entry) a trainable deep copy for `adapter`, in
    `module`'s mode (train or eval)."""
    meta = saved_meta(module) or SavedMeta()
    if adapter in meta.adapters:
        raise ValueError(f"adapter {adapter!r} already has a copy of {type(module).__name__}")
    copy_of = _in_mode_of(module, _copy_without_fxlora(module))
    _child_dict(module, "modules_to_save", nn.ModuleDict)[adapter] = copy_of
    meta.adapters.append(adapter)
    module.__dict__[META_ATTR] = meta


def _copy_without_fxlora(module: nn.Module) -> nn.Module:
    """A deep copy of `module` as the user built it (no fxlora children, no installed forward)."""
    import copy

    saved_children = {k: module._modules.pop(k) for k in LORA_CHILDREN if k in module._modules}
    saved_attrs = {k: module.__dict__.pop(k) for k in (META_ATTR, "forward") if k in module.__dict__}
    try:
        clone = copy.deepcopy(module)
    finally:
        module._modules.update(saved_children)
        module.__dict__.update(saved_attrs)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def remove_adapter(module: nn.Module, adapter: str) -> None:
    """Remove one adapter's modules from `module`; drop fxlora entirely when none is left."""
    for _, holder in adapter_holders(module):
        if adapter in holder:
            del holder[adapter]
    meta = module.__dict__.get(META_ATTR)
    if isinstance(meta, TargetMeta):
        meta.adapters.pop(adapter, None)
        left = bool(meta.adapters)
    elif isinstance(meta, SavedMeta):
        if adapter in meta.adapters:
            meta.adapters.remove(adapter)
        left = bool(meta.adapters)
    else:
        left = False
    if not left:
        detach_all(module)


def detach_all(module: nn.Module) -> None:
    """Remove every fxlora child and record from `module` (not its installed forward)."""
    for path, _ in adapter_holders(module):
        owner_path, _, name = path.rpartition(".")
        module.get_submodule(owner_path)._modules.pop(name, None)
    module.__dict__.pop(META_ATTR, None)


def saved_copy_choice(module: nn.Module, adapters: list[str]) -> Optional[str]:
    """For a `modules_to_save` module: the adapter among `adapters` whose trained copy the
    merged model keeps (the last one in the module's order, as the forward selects), else None."""
    meta = saved_meta(module)
    if meta is None:
        return None
    owning = [a for a in meta.adapters if a in adapters]
    return owning[-1] if owning else None
