"""``target_parameters``: which ``nn.Parameter``s a config adapts (PEFT's rules), and PEFT's
resolution of transformers 5 MoE models (fused experts, routers) for ``"all-linear"``.

Matching (PEFT 0.21.2's ``_inject_parameters``): for every module (``named_modules()`` order) and
each of its own parameters ``p`` (registration order), the key ``f"{module}.{p}"`` is targeted when
it equals an entry of ``target_parameters`` or ends with ``"." + entry``. A parameter of the model
itself (no module name) cannot be targeted; neither can one of a module ``target_modules`` also
adapts, or one inside a ``modules_to_save`` module. ``exclude_modules`` and ``layers_to_transform``
do not apply to parameters (as in PEFT). Each targeted parameter's rank and alpha follow
``rank_pattern`` / ``alpha_pattern`` on its full name.

transformers 5 turned the experts of some MoE families into fused 3-D parameters and their router
into a module holding a ``weight``; PEFT converts configs written for the older modules
(``_MOE_NAMES``: the family of the model's ``model_type``, from transformers' conversion table):
a ``target_modules`` entry naming an expert projection or the router moves to ``target_parameters``
(``w1``/``w3`` or ``gate_proj``/``up_proj`` -> ``gate_up_proj``, which then takes rank ``2 r`` and
alpha ``2 lora_alpha``: two fused updates). ``"all-linear"`` resolves to the last components of the
linear layers' names plus every old name, so on such a model it adapts attention, experts and
router. fxlora does the same (`moe_resolution`); the LoraConfig itself is left as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch.nn as nn

from fxlora.config import LoraConfig, first_pattern_match, scaling_value
from fxlora.planning.names import is_under, matches_name_list
from fxlora.core.layers import AdapterSpec, fxlora_internal_names, target_meta
from fxlora.errors import NoTargetFoundError, UnsupportedTargetError
from fxlora.kinds.parameter import PARAMETER, ParamTarget

__all__ = [
    "ParameterSpec",
    "MoeResolution",
    "moe_resolution",
    "moe_family",
    "moe_expert_sources",
    "select_parameters",
    "check_module_target",
    "parameter_specs",
    "parameter_fields",
]

#: old (transformers 4) module name -> new parameter name, per MoE family (PEFT's table)
_MOE_NAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
}
#: new parameters fused from several old modules, and those modules (order kept)
_MOE_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


@dataclass
class ParameterSpec(AdapterSpec):
    """An adapter on the targeted parameters of one module: one `ParamTarget` per parameter, in the
    module's registration order. The kind applies each parameter's scaling (`fxlora.kinds.parameter`),
    so the adapter's own scaling is 1.0."""

    params: tuple[ParamTarget, ...] = ()

    @property
    def scaling(self) -> float:
        return 1.0


class MoeResolution(NamedTuple):
    """PEFT's conversion of a config for a transformers 5 MoE model: module targets (a list of
    names, suffix rule), parameter targets, and the rank / alpha patterns it adds."""

    target_modules: list[str]
    target_parameters: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def moe_family(model: nn.Module) -> Optional[str]:
    """The MoE family (`_MOE_NAMES`) of a transformers model whose ``model_type`` transformers
    converts, as PEFT finds it; None for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:
        return None
    family = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    if family not in _MOE_NAMES:  # asked first: transformers hands out a deep copy of a model's mapping (2 ms for llama's)
        return None
    return family if get_checkpoint_conversion_mapping(model_type) is not None else None


def moe_expert_sources(family: str) -> dict[str, tuple[str, ...]]:
    """``{fused expert parameter: the transformers 4 per-expert modules it replaces, in the order
    they are stacked on its output dimension}`` for a `moe_family` (``gate_up_proj``: ``w1``, ``w3``
    or ``gate_proj``, ``up_proj``; ``down_proj``: ``w2`` or ``down_proj``). The router is left out:
    it stays one matrix (``gate`` -> ``gate.weight``)."""
    fused = _MOE_FUSED[family]
    singles = {new: (old,) for old, new in _MOE_NAMES[family].items() if "." not in new and new not in fused}
    return {**fused, **singles}


def moe_resolution(model: nn.Module, config: LoraConfig, all_linear_names: Sequence[str]) -> Optional[MoeResolution]:
    """PEFT's conversion of `config` for `model` (None where it converts nothing): `all_linear_names`
    are the modules ``"all-linear"`` selects. Raises ValueError where a fused parameter's old
    modules are named only in part (PEFT's error)."""
    family = moe_family(model)
    if family is None or config.target_modules is None:
        return None
    names = _MOE_NAMES[family]
    if config.is_all_linear:
        wanted = {n.rsplit(".", 1)[-1] for n in all_linear_names} | set(names)
    elif isinstance(config.target_modules, str):
        return None  # a regex on a converted model: fxlora matches it as written (see the README)
    else:
        wanted = set(config.target_modules)
    modules, params, found = [], set(config.target_parameters or ()), {}
    for entry in sorted(wanted):
        old = next((o for o in names if matches_name_list([o], entry)), None)
        if old is None:
            modules.append(entry)
            continue
        params.add(names[old])
        found.setdefault(names[old], set()).add(old)
    ranks, alphas = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in _MOE_FUSED[family].items():
        present = found.get(new, set())
        if 0 < len(present) < len(olds):
            raise ValueError(
                f"target_modules names {sorted(present)} but not {sorted(set(olds) - present)}: on this "
                f"{family} model they are fused into the parameter {new!r} and can only be adapted together"
            )
        if len(present) == len(olds):
            ranks[rf".*\.{re.escape(new)}"] = config.r * len(olds)
            alphas[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(olds)
    return MoeResolution(modules, sorted(params), ranks, alphas)


def select_parameters(
    model: nn.Module, entries: Sequence[str], module_targets: Sequence[str], saved: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """``{module name: its targeted parameter names}`` for the `entries` of ``target_parameters``
    (PEFT's rule), in ``named_modules()`` order; raises `NoTargetFoundError` if nothing matched and
    `UnsupportedTargetError` for a parameter fxlora cannot adapt. Changes nothing."""
    internal = fxlora_internal_names(model)
    found: dict[str, tuple[str, ...]] = {}
    for module_name, module in model.named_modules():
        if module_name in internal:
            continue
        hits = tuple(p for p, _ in module.named_parameters(recurse=False) if matches_name_list(entries, f"{module_name}.{p}"))
        if not hits:
            continue
        _check_owner(module_name, module, hits, module_targets, saved)
        found[module_name] = hits
    if not found:
        shown = [
            f"{m}.{p}" for m, mod in model.named_modules() if m and m not in internal
            for p, t in mod.named_parameters(recurse=False) if t.dim() in (2, 3)
        ]
        listed = ", ".join(repr(n) for n in shown[:8]) + (f", ... ({len(shown)} in all)" if len(shown) > 8 else "")
        raise NoTargetFoundError(
            f"target_parameters={list(entries)!r} matched no parameter of {type(model).__name__} (an entry names a "
            f"parameter, not a module or buffer: the full name or a suffix starting at a dot, e.g. "
            f"'experts.gate_up_proj'). Its 2-D and 3-D parameters: {listed or '(none)'}"
        )
    return found


def check_module_target(key: str, module: nn.Module) -> None:
    """`UnsupportedTargetError` if `module`, a match of ``target_modules``, carries adapters on its
    parameters (a module takes LoRA either on its output or on its parameters)."""
    meta = target_meta(module)
    if meta is not None and meta.kind is PARAMETER:
        raise UnsupportedTargetError(
            f"module {key!r} matched target_modules, but it carries adapters on its parameters "
            f"({', '.join(meta.adapters)}: target_parameters); a module takes LoRA either on its output or on its "
            "parameters; leave it out of target_modules (exclude_modules)"
        )


def _check_owner(name: str, module: nn.Module, hits: tuple[str, ...], module_targets: Sequence[str], saved: Sequence[str]) -> None:
    where = f"{name}.{hits[0]}" if name else hits[0]
    if not name:
        raise UnsupportedTargetError(
            f"target_parameters matched {hits[0]!r}, a parameter of the model itself; only parameters of its "
            "submodules can be targeted (as in PEFT); name a submodule's parameter"
        )
    if name in module_targets:
        raise UnsupportedTargetError(
            f"target_parameters matched {where!r}, but its module {name!r} is also a target of target_modules; a "
            "module takes LoRA either on its output or on its parameters (PEFT refuses this too); narrow one of them"
        )
    if is_under(name, saved):
        raise UnsupportedTargetError(
            f"target_parameters matched {where!r}, inside the modules_to_save module it belongs to; a module trained "
            "in full takes no LoRA; list it in one of the two"
        )
    meta = target_meta(module)
    if meta is not None and meta.kind is not PARAMETER:
        raise UnsupportedTargetError(
            f"target_parameters matched {where!r}, but {name!r} already carries adapters on its output "
            f"({', '.join(meta.adapters)}); a module takes LoRA either on its output or on its parameters"
        )
    if meta is not None:
        theirs = next(iter(meta.adapters.values())).params
        if tuple(t.name for t in theirs) != hits:
            raise UnsupportedTargetError(
                f"target_parameters selects {list(hits)} of {name!r}, but its other adapters ({', '.join(meta.adapters)}) "
                f"target {[t.name for t in theirs]}; all adapters on one module target the same parameters (as in PEFT)"
            )
    for p in hits:
        tensor = getattr(module, p)
        if tensor.dim() not in (2, 3):
            raise UnsupportedTargetError(
                f"target_parameters matched {name}.{p} of shape {tuple(tensor.shape)}: LoRA takes 2-D and 3-D "
                "parameters only (a matrix, or experts stacked on dim 0), as in PEFT; name another parameter"
            )


def parameter_specs(
    model: nn.Module, config: LoraConfig, found: dict[str, tuple[str, ...]], ranks: dict, alphas: dict
) -> dict[str, ParameterSpec]:
    """The `ParameterSpec` of each module of `found`, with each parameter's rank and alpha from
    `ranks` / `alphas` (the config's patterns, plus PEFT's MoE ones) on its full name; raises where
    the config's options cannot adapt parameters (`LayerKind.check_spec`)."""
    from fxlora.variants import variant_for

    if found and config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} cannot initialise target_parameters "
            f"({', '.join(found)}): it splits a weight matrix, which PEFT does not do for parameters either; "
            "use True, False or 'gaussian'"
        )
    specs = {}
    for module_name, params in found.items():
        targets = []
        for p in params:
            full = f"{module_name}.{p}"
            rank_key, alpha_key = first_pattern_match(ranks, full), first_pattern_match(alphas, full)
            r = config.r if rank_key is None else ranks[rank_key]
            alpha = config.lora_alpha if alpha_key is None else alphas[alpha_key]
            targets.append(ParamTarget(p, r, alpha, scaling_value(alpha, r, config.use_rslora)))
        specs[module_name] = ParameterSpec(
            r=targets[0].r,
            alpha=targets[0].alpha,
            use_rslora=config.use_rslora,
            lora_bias=config.lora_bias,
            dropout=float(config.lora_dropout),
            variant=variant_for(config),
            params=tuple(targets),
        )
        PARAMETER.check_spec(repr(module_name), model.get_submodule(module_name), specs[module_name])
    return specs


def parameter_fields(model: nn.Module, adapter: str, config: LoraConfig) -> dict:
    """For an adapter with parameter targets on `model`: the config fields its saved file holds so
    that PEFT and fxlora adapt exactly what it adapts (``target_modules``: the adapted modules' names,
    possibly none; ``target_parameters``: the parameters' full names; each parameter's rank and alpha
    where the config's patterns would not give them, first in the patterns); else ``{}``."""
    modules, params, ranks, alphas = [], [], {}, {}
    for name, module in model.named_modules():
        meta = target_meta(module)
        if meta is None or adapter not in meta.adapters:
            continue
        if meta.kind is not PARAMETER:
            modules.append(name)
            continue
        for target in meta.adapters[adapter].params:
            full = f"{name}.{target.name}"
            params.append(full)
            if config.rank_for(full) != target.r or config.alpha_for(full) != target.alpha:
                ranks[re.escape(full)], alphas[re.escape(full)] = target.r, target.alpha
    if not params:
        return {}
    return {
        "target_modules": modules,
        "target_parameters": params,
        "rank_pattern": {**ranks, **config.rank_pattern},
        "alpha_pattern": {**alphas, **config.alpha_pattern},
    }
